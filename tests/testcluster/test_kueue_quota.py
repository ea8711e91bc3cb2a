"""The Kueue stand-in's ClusterQueue quota (testcluster.kueue, ``quota=``): Kueue's accounting of a Workload
(count x the pod template's requests), admission in creation order while Workloads fit, Kueue's messages for
one that does not, and quota released when a Workload finishes, is deactivated or goes with its Job.

The pure parts are checked directly; the controller runs against the API server and Job controller over real
HTTP (as tests/testcluster/test_kueue.py, whose Kueue has no quota: admission at once stays the default),
one KueueController per test watching that test's namespace only, so each test has a ClusterQueue of its own.
Pods that must finish run on the node (root only); the others stay Pending (GPU pods: the node has none)."""
from __future__ import annotations

import asyncio
import itertools
import os
import time

import pytest

from .apiserver_helpers import eventually
from testcluster import ApiServer
from testcluster.client import Client
from testcluster.jobcontroller import JobController
from testcluster.kueue import (JOB_UID_LABEL, QUEUE_LABEL, WORKLOAD_GV, KueueController, format_quantity,
                               parse_quota, pending_message, pod_set_usage, workload_usage)

PY = "testcluster/python:3.11"
ROOT = os.geteuid() == 0
needs_node = pytest.mark.skipif(not ROOT, reason="the node's sandbox needs root (mount namespaces)")
pytestmark = pytest.mark.timeout(120)
_ns = itertools.count()
QUOTA = {"nvidia.com/gpu": 32, "cpu": "64", "memory": "256Gi"}
PREFIX = "couldn't assign flavors to pod set main: "


# ---- accounting and messages (pure) ------------------------------------------------------------------------

def _template(requests=None, limits=None, init=None) -> dict:
    resources = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    spec = {"containers": [{"name": "main", "image": PY, "resources": resources}]}
    if init:
        spec["initContainers"] = [{"name": "init", "image": PY, "resources": {"requests": init}}]
    return {"spec": spec}


def _workload(count: int, **template) -> dict:
    return {"spec": {"podSets": [{"name": "main", "count": count, "template": _template(**template)}]}}


def test_usage_is_count_times_one_pods_requests_as_kueue_counts_them():
    quota = parse_quota(QUOTA)
    assert quota == {"nvidia.com/gpu": 32, "cpu": 64000, "memory": 256 * 2 ** 30}  # cpu in millicores
    # limits stand in for absent requests (extended resources are usually given as limits only)
    gang = _workload(4, requests={"cpu": "1500m", "memory": "8Gi"}, limits={"nvidia.com/gpu": "8"})
    assert workload_usage(gang, quota) == {"nvidia.com/gpu": 32, "cpu": 6000, "memory": 32 * 2 ** 30}
    # the larger of the containers' sum and an init container, zero requests left out, pods when counted
    ps = {"name": "main", "count": 2, "template": _template(requests={"cpu": "1", "memory": "0"}, init={"cpu": "3"})}
    assert pod_set_usage(ps, quota) == {"cpu": 6000}
    assert pod_set_usage(ps, {"pods": 10}) == {"cpu": 6000, "pods": 2}
    # quantities printed as Kueue prints them (resource.Quantity's canonical form)
    assert [format_quantity(r, v) for r, v in (("cpu", 1500), ("cpu", 2000), ("memory", 32 * 2 ** 30),
                                               ("memory", 2560 * 2 ** 20), ("nvidia.com/gpu", 64))] == \
        ["1500m", "2", "32Gi", "2560Mi", "64"]


def test_messages_for_a_workload_that_does_not_fit():
    quota = parse_quota(QUOTA)
    gpus = lambda n: _workload(n, requests={"cpu": "1", "memory": "8Gi"}, limits={"nvidia.com/gpu": "8"})  # noqa: E731
    assert pending_message(gpus(4), quota, {}) == ""  # 32 of 32: fits
    assert pending_message(gpus(8), quota, {}) == PREFIX + (
        "insufficient quota for nvidia.com/gpu in flavor default-flavor, request > maximum capacity (64 > 32)")
    used = workload_usage(gpus(4), quota)
    assert pending_message(gpus(4), quota, used) == PREFIX + (
        "insufficient unused quota for nvidia.com/gpu in flavor default-flavor, 32 more needed")
    # every short resource, sorted; a resource the quota does not cover can never be admitted
    tight = parse_quota({"nvidia.com/gpu": 32, "cpu": "4", "memory": "256Gi"})
    assert pending_message(gpus(4), tight, {"cpu": 1000, "nvidia.com/gpu": 8}) == PREFIX + (
        "insufficient unused quota for cpu in flavor default-flavor, 1 more needed, "
        "insufficient unused quota for nvidia.com/gpu in flavor default-flavor, 8 more needed")
    assert pending_message(gpus(1), parse_quota({"nvidia.com/gpu": 32, "cpu": "4"}), {}) == PREFIX + (
        "resource memory unavailable in ClusterQueue")


# ---- the controller ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(server, node or None): API server and Job controller, and a node when root."""
    root = tmp_path_factory.mktemp("kueue-quota")
    with ApiServer(crds_dir=None, gc_delay=0.05, gc_interval=0.3) as srv:
        with JobController(srv.url, backoff_base=0.5, batch_period=0.05, api_backoff=(0.05, 0.5)):
            if ROOT:
                from testcluster.kubelet import Node
                from testcluster.podnet import PodNetwork

                with PodNetwork.create("node-1") as net:
                    srv.listen(net.gateway)
                    with Node(srv.url, root, retry_seconds=0.2, network=net) as node:
                        yield srv, node
            else:
                yield srv, None


def run(server, quota: dict, body):
    """``body(client, namespace, kueue)`` in a fresh namespace with a Kueue of ``quota`` watching it."""
    srv = server[0]
    ns = f"kq-quota{next(_ns)}"

    async def main():
        async with Client(srv.url) as client:
            await client.create("v1", "namespaces", None, {"metadata": {"name": ns}})
            try:
                return await body(client, ns)
            finally:  # the node is shared by the module's tests: no pod left running on it
                items, _ = await client.list("batch/v1", "jobs", ns)
                for item in items:
                    await client.delete("batch/v1", "jobs", ns, item["metadata"]["name"], propagation="Background")
    with KueueController(srv.url, namespace=ns, quota=quota, retry=0.2):
        return asyncio.run(main())


def job(name: str, pods: int, *, gpus: int = 8, cpu: str = "1", code: str = "import time; time.sleep(600)") -> dict:
    resources = {"requests": {"cpu": cpu, "memory": "1Gi"}}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": str(gpus)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": {QUEUE_LABEL: "team-a"}},
            "spec": {"suspend": True, "backoffLimit": 0, "parallelism": pods, "completions": pods,
                     "completionMode": "Indexed", "template": {"spec": {
                         "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "main", "image": PY, "command": ["python3", "-c", code],
                                         "resources": resources}]}}}}


def cond(obj: dict | None, type_: str) -> dict:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


async def workload_of(client: Client, ns: str, job_obj: dict) -> dict:
    async def find():
        items, _ = await client.list(WORKLOAD_GV, "workloads", ns,
                                     label_selector=f"{JOB_UID_LABEL}={job_obj['metadata']['uid']}")
        return items[0] if items else None
    return await eventually(find, f"the Workload of {job_obj['metadata']['name']}")


async def admitted(client: Client, ns: str, job_obj: dict, timeout: float = 30.0) -> dict:
    """The Job's Workload once admitted and the Job unsuspended."""
    async def ok():
        wl = await workload_of(client, ns, job_obj)
        j = await client.get("batch/v1", "jobs", ns, job_obj["metadata"]["name"])
        return wl if cond(wl, "Admitted").get("status") == "True" and j["spec"].get("suspend") is False else None
    return await eventually(ok, f"{job_obj['metadata']['name']} admitted", timeout)


async def pending(client: Client, ns: str, job_obj: dict, message: str) -> dict:
    async def ok():
        wl = await workload_of(client, ns, job_obj)
        c = cond(wl, "QuotaReserved")
        return wl if (c.get("status"), c.get("reason"), c.get("message")) == ("False", "Pending", message) else None
    return await eventually(ok, f"{job_obj['metadata']['name']} pending with {message!r}")


async def still_suspended(client: Client, ns: str, name: str, seconds: float = 0.6) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        j = await client.get("batch/v1", "jobs", ns, name)
        assert j["spec"]["suspend"] is True and not (j.get("status") or {}).get("active")
        await asyncio.sleep(0.1)


def test_gangs_admitted_while_they_fit_the_rest_pending_with_kueues_message(server):
    async def body(client, ns):
        first = await client.create("batch/v1", "jobs", ns, job("first", 4))   # 4 x 8 = 32 GPUs: the whole queue
        wl = await admitted(client, ns, first)
        [assignment] = wl["status"]["admission"]["podSetAssignments"]
        assert assignment["count"] == 4 and assignment["flavors"] == {
            "cpu": "default-flavor", "memory": "default-flavor", "nvidia.com/gpu": "default-flavor"}
        assert assignment["resourceUsage"] == {"cpu": "4", "memory": "4Gi", "nvidia.com/gpu": "32"}

        second = await client.create("batch/v1", "jobs", ns, job("second", 4))
        waiting = await pending(client, ns, second, PREFIX + (
            "insufficient unused quota for nvidia.com/gpu in flavor default-flavor, 32 more needed"))
        assert cond(waiting, "Admitted") == {} and "admission" not in waiting["status"]
        huge = await client.create("batch/v1", "jobs", ns, job("huge", 8))    # 64 GPUs: never
        await pending(client, ns, huge, PREFIX + (
            "insufficient quota for nvidia.com/gpu in flavor default-flavor, request > maximum capacity (64 > 32)"))
        # BestEffortFIFO: a later Workload that fits is not held up by the older ones that do not
        small = await client.create("batch/v1", "jobs", ns, job("small", 2, gpus=0, cpu="100m"))
        await admitted(client, ns, small)
        await still_suspended(client, ns, "second")
        # while it has no quota Kueue keeps the Job suspended, whoever unsuspends it
        await client.patch("batch/v1", "jobs", ns, "second", {"spec": {"suspend": False}})

        async def suspended_again():
            return (await client.get("batch/v1", "jobs", ns, "second"))["spec"]["suspend"] is True
        await eventually(suspended_again, "Kueue suspending the unadmitted Job again")

        async def pending_event():
            items, _ = await client.list("v1", "events", ns)
            return [e for e in items if e["reason"] == "Pending" and e["type"] == "Warning"
                    and e["involvedObject"]["kind"] == "Workload"
                    and e["involvedObject"]["name"] == waiting["metadata"]["name"]]
        assert "32 more needed" in (await eventually(pending_event, "Kueue's Pending Event"))[0]["message"]

        # the first gang's Job deleted: its Workload goes with it, its quota is free, the second is admitted
        await client.delete("batch/v1", "jobs", ns, "first", propagation="Background")
        await admitted(client, ns, second)
        j = await client.get("batch/v1", "jobs", ns, "huge")
        assert j["spec"]["suspend"] is True  # still more than the queue holds
    run(server, QUOTA, body)


def test_a_deactivated_workload_releases_its_quota_once_its_pods_are_gone(server):
    async def body(client, ns):
        first = await client.create("batch/v1", "jobs", ns, job("first", 4))
        wl = await admitted(client, ns, first)
        second = await client.create("batch/v1", "jobs", ns, job("second", 2))
        await pending(client, ns, second, PREFIX + (
            "insufficient unused quota for nvidia.com/gpu in flavor default-flavor, 16 more needed"))
        await client.patch(WORKLOAD_GV, "workloads", ns, wl["metadata"]["name"], {"spec": {"active": False}})
        await admitted(client, ns, second)
        gone = await client.get(WORKLOAD_GV, "workloads", ns, wl["metadata"]["name"])
        assert cond(gone, "QuotaReserved")["status"] == "False" and "admission" not in gone["status"]
        # reactivated, it is back in the queue: 16 GPUs are taken now
        await client.patch(WORKLOAD_GV, "workloads", ns, wl["metadata"]["name"], {"spec": {"active": True}})
        await pending(client, ns, first, PREFIX + (
            "insufficient unused quota for nvidia.com/gpu in flavor default-flavor, 16 more needed"))
    run(server, QUOTA, body)


@needs_node
def test_a_finished_workload_releases_its_quota(server):
    async def body(client, ns):
        jobs = [await client.create("batch/v1", "jobs", ns, job(f"run-{i}", 1, gpus=0, cpu="500m", code="print(1)"))
                for i in range(3)]
        await admitted(client, ns, jobs[0])
        for later in jobs[1:]:  # one at a time: each waits for the one before it to finish
            wl = await workload_of(client, ns, later)
            assert cond(wl, "Admitted").get("status") != "True"
        for j in jobs:
            wl = await admitted(client, ns, j, timeout=60)

            async def finished(name=wl["metadata"]["name"]):
                w = await client.get(WORKLOAD_GV, "workloads", ns, name)
                return w if cond(w, "Finished").get("status") == "True" else None
            await eventually(finished, f"{j['metadata']['name']} finished", 60)
    run(server, {"cpu": "500m", "memory": "1Gi"}, body)
