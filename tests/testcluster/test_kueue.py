"""The Kueue stand-in (testcluster.kueue) against the API server, Job controller and node stand-ins, over
real HTTP: Jobs are created directly through the API, labelled ``kueue.x-k8s.io/queue-name`` and suspended,
as an operator creates them. Tests whose pods must run use the node (real processes of the tiny
``testcluster/python:3.11`` image; it needs root); the others leave pods Pending (no node is asked to run
them: the node's scheduler binds them, which changes nothing here). Each test has its own namespace."""
from __future__ import annotations

import asyncio
import itertools
import os
import re

import pytest

from .apiserver_helpers import eventually
from testcluster import ApiServer
from testcluster.client import Client
from testcluster.jobcontroller import JobController
from testcluster.kueue import (CRD_NAME, JOB_UID_LABEL, QUEUE_LABEL, WORKLOAD_GV, KueueController, workload_name)

PY = "testcluster/python:3.11"
ROOT = os.geteuid() == 0
needs_node = pytest.mark.skipif(not ROOT, reason="the node's sandbox needs root (mount namespaces)")
pytestmark = pytest.mark.timeout(120)
_ns = itertools.count()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(server, kueue, node or None): API server, Job controller, Kueue, and a node when root."""
    root = tmp_path_factory.mktemp("kueue")
    with ApiServer(crds_dir=None, gc_delay=0.05, gc_interval=0.3) as server:
        with JobController(server.url, backoff_base=0.5, batch_period=0.05, api_backoff=(0.05, 0.5)), \
                KueueController(server.url, retry=0.2) as kueue:
            if ROOT:
                from testcluster.kubelet import Node
                from testcluster.podnet import PodNetwork

                with PodNetwork.create("node-1") as net:
                    server.listen(net.gateway)
                    with Node(server.url, root, retry_seconds=0.2, network=net) as node:
                        yield server, kueue, node
            else:
                yield server, kueue, None


def run(cluster, body):
    """``body(client, namespace)`` in a fresh namespace."""
    ns = f"kq{next(_ns)}"

    async def main():
        async with Client(cluster[0].url) as client:
            await client.create("v1", "namespaces", None, {"metadata": {"name": ns}})
            return await body(client, ns)
    return asyncio.run(main())


def job_body(name: str, *, queue: str | None = "user-queue", code: str = "import time; time.sleep(600)",
             suspend: bool = True, **spec) -> dict:
    labels = {QUEUE_LABEL: queue} if queue else {}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
            "spec": {"suspend": suspend, "backoffLimit": 0, **spec, "template": {"spec": {
                "restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
                "containers": [{"name": "main", "image": PY, "command": ["python3", "-c", code]}]}}}}


def cond(obj: dict | None, type_: str) -> dict | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def is_true(obj: dict | None, type_: str) -> bool:
    c = cond(obj, type_)
    return bool(c) and c["status"] == "True"


async def workloads(client: Client, ns: str) -> list[dict]:
    items, _ = await client.list(WORKLOAD_GV, "workloads", ns)
    return items


async def the_workload(client: Client, ns: str, job: dict) -> dict:
    async def find():
        items = [w for w in await workloads(client, ns)
                 if (w["metadata"].get("labels") or {}).get(JOB_UID_LABEL) == job["metadata"]["uid"]]
        return items[0] if items else None
    return await eventually(find, f"the Workload of {job['metadata']['name']}")


async def admitted_and_running(client: Client, ns: str, job: dict) -> dict:
    """Wait for the Workload to be admitted and the Job unsuspended; returns the Workload."""
    wl = await the_workload(client, ns, job)
    name = wl["metadata"]["name"]

    async def ok():
        w = await client.get(WORKLOAD_GV, "workloads", ns, name)
        j = await client.get("batch/v1", "jobs", ns, job["metadata"]["name"])
        return w if is_true(w, "Admitted") and j["spec"].get("suspend") is False else None
    return await eventually(ok, "admission and the Job unsuspended")


async def job_suspend(client: Client, ns: str, name: str) -> bool:
    return (await client.get("batch/v1", "jobs", ns, name))["spec"].get("suspend")


async def set_active(client: Client, ns: str, wl: dict, active: bool) -> None:
    await client.patch(WORKLOAD_GV, "workloads", ns, wl["metadata"]["name"], {"spec": {"active": active}})


def test_workload_kind_is_served(cluster):
    server = cluster[0]

    async def body(client, ns):
        crd = await client.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, CRD_NAME)
        assert crd["spec"]["group"] == "kueue.x-k8s.io" and crd["spec"]["scope"] == "Namespaced"
        # spec.active defaults to true; status is a subresource (dropped on create, kept off spec writes)
        wl = await client.create(WORKLOAD_GV, "workloads", ns, {
            "apiVersion": WORKLOAD_GV, "kind": "Workload", "metadata": {"name": "hand-made"},
            "spec": {"queueName": "q", "podSets": [{"name": "main", "count": 1, "template": {"spec": {
                "containers": [{"name": "c", "image": "x"}]}}}]},
            "status": {"conditions": [{"type": "Admitted", "status": "True", "reason": "X", "message": "",
                                       "lastTransitionTime": "2024-01-01T00:00:00Z"}]}})
        assert wl["spec"]["active"] is True
        assert not (wl.get("status") or {}).get("conditions")
        # a Workload not owned by a Job is not the Job integration's: left alone
        await asyncio.sleep(0.5)
        again = await client.get(WORKLOAD_GV, "workloads", ns, "hand-made")
        assert not (again.get("status") or {}).get("conditions")
    run(cluster, body)
    assert server.objects(WORKLOAD_GV, "workloads") is not None


def test_workload_created_admitted_and_job_unsuspended(cluster):
    kueue = cluster[1]

    async def body(client, ns):
        job = await client.create("batch/v1", "jobs", ns, job_body("train", parallelism=2, completions=3))
        uid = job["metadata"]["uid"]
        wl = await admitted_and_running(client, ns, job)
        meta = wl["metadata"]
        assert meta["name"] == workload_name("train", uid)
        assert re.fullmatch(r"job-train-[0-9a-f]{5}", meta["name"])
        assert (ns, meta["name"]) in kueue.created
        assert meta["labels"][JOB_UID_LABEL] == uid
        assert meta["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": "train", "uid": uid,
                                            "controller": True, "blockOwnerDeletion": True}]
        assert wl["spec"]["queueName"] == "user-queue" and wl["spec"]["active"] is True
        [ps] = wl["spec"]["podSets"]
        assert ps["name"] == "main" and ps["count"] == 2
        assert ps["template"]["spec"]["containers"][0]["image"] == PY
        assert is_true(wl, "QuotaReserved") and is_true(wl, "Admitted")
        assert cond(wl, "Admitted")["reason"] == "Admitted"
        assert wl["status"]["admission"]["clusterQueue"] == "cluster-queue"
        assert wl["status"]["admission"]["podSetAssignments"][0]["count"] == 2
        assert len(await workloads(client, ns)) == 1  # one per Job, however often it syncs

        async def events():
            items, _ = await client.list("v1", "events", ns)
            reasons = {(e["involvedObject"]["kind"], e["reason"]) for e in items}
            return reasons if {("Job", "CreatedWorkload"), ("Job", "Started"),
                               ("Workload", "Admitted")} <= reasons else None
        await eventually(events, "Kueue's Events")
    run(cluster, body)


def test_job_without_queue_label_is_left_alone(cluster):
    async def body(client, ns):
        await client.create("batch/v1", "jobs", ns, job_body("plain", queue=None))
        await asyncio.sleep(1.0)
        assert await workloads(client, ns) == []
        assert await job_suspend(client, ns, "plain") is True
    run(cluster, body)


def test_kueue_owns_suspend_of_an_admitted_job(cluster):
    """An operator's own suspend patch on an admitted, active Workload's Job is undone."""
    async def body(client, ns):
        job = await client.create("batch/v1", "jobs", ns, job_body("owned"))
        await admitted_and_running(client, ns, job)
        patched = await client.patch("batch/v1", "jobs", ns, "owned", {"spec": {"suspend": True}})
        assert patched["spec"]["suspend"] is True

        async def resumed():
            return await job_suspend(client, ns, "owned") is False
        await eventually(resumed, "Kueue unsuspending the Job again")
        wl = await the_workload(client, ns, job)
        assert is_true(wl, "Admitted") and not cond(wl, "Evicted")
    run(cluster, body)


def test_inactive_workload_is_evicted_and_its_job_suspended_until_reactivated(cluster):
    async def body(client, ns):
        job = await client.create("batch/v1", "jobs", ns, job_body("pause", parallelism=2))
        wl = await admitted_and_running(client, ns, job)
        name = wl["metadata"]["name"]

        async def pods():
            # Running ones: the node stand-in can miss a deletion that comes while a pod is still starting
            # (the pod then stays Running with its deletionTimestamp), which is not what is tested here.
            items, _ = await client.list("v1", "pods", ns, label_selector="batch.kubernetes.io/job-name=pause")
            return [p for p in items if not p["metadata"].get("deletionTimestamp")
                    and (not ROOT or (p.get("status") or {}).get("phase") == "Running")]
        await eventually(lambda: _len_at_least(pods, 2), "the Job's pods running")

        await set_active(client, ns, wl, False)

        async def evicted():
            w = await client.get(WORKLOAD_GV, "workloads", ns, name)
            return w if (is_true(w, "Evicted") and cond(w, "QuotaReserved")["status"] == "False"
                         and cond(w, "Admitted")["status"] == "False") else None
        w = await eventually(evicted, "eviction of the inactive Workload")
        assert cond(w, "Evicted")["reason"] == "InactiveWorkload"
        assert cond(w, "Requeued")["status"] == "False" and cond(w, "Requeued")["reason"] == "InactiveWorkload"
        assert "admission" not in w["status"]
        assert await job_suspend(client, ns, "pause") is True

        async def no_pods():
            items, _ = await client.list("v1", "pods", ns, label_selector="batch.kubernetes.io/job-name=pause")
            return items == []
        await eventually(no_pods, "the Job controller deleting the suspended Job's pods")

        # It stays so: an unsuspend by someone else is undone while the Workload is inactive.
        await client.patch("batch/v1", "jobs", ns, "pause", {"spec": {"suspend": False}})

        async def suspended_again():
            return await job_suspend(client, ns, "pause") is True
        await eventually(suspended_again, "Kueue suspending the Job again")
        await asyncio.sleep(0.7)
        assert await job_suspend(client, ns, "pause") is True
        w = await client.get(WORKLOAD_GV, "workloads", ns, name)
        assert not is_true(w, "Admitted") and w["spec"]["active"] is False

        # Reactivated: admitted again, the Job unsuspended, its pods back.
        await set_active(client, ns, w, True)
        w = await admitted_and_running(client, ns, job)
        assert w["metadata"]["name"] == name  # the same Workload
        assert cond(w, "Evicted")["status"] == "False" and is_true(w, "QuotaReserved")
        assert w["status"]["admission"]["clusterQueue"] == "cluster-queue"
        await eventually(lambda: _len_at_least(pods, 2), "the pods created again")
    run(cluster, body)


async def _len_at_least(fn, n: int):
    items = await fn()
    return items if len(items) >= n else None


@needs_node
def test_finished_job_finishes_its_workload(cluster):
    async def body(client, ns):
        ok = await client.create("batch/v1", "jobs", ns, job_body("ok", code="print('done')"))
        bad = await client.create("batch/v1", "jobs", ns, job_body("bad", code="raise SystemExit(3)"))
        for job, reason in ((ok, "Succeeded"), (bad, "Failed")):
            wl = await the_workload(client, ns, job)

            async def finished():
                w = await client.get(WORKLOAD_GV, "workloads", ns, wl["metadata"]["name"])
                return w if is_true(w, "Finished") else None
            w = await eventually(finished, f"Finished on {wl['metadata']['name']}", timeout=60)
            assert cond(w, "Finished")["reason"] == reason
            j = await client.get("batch/v1", "jobs", ns, job["metadata"]["name"])
            assert is_true(j, "Complete" if reason == "Succeeded" else "Failed")
            assert j["spec"]["suspend"] is False  # a finished Job is not suspended again
    run(cluster, body)


def test_workload_is_collected_with_its_job(cluster):
    async def body(client, ns):
        job = await client.create("batch/v1", "jobs", ns, job_body("gone"))
        wl = await admitted_and_running(client, ns, job)
        await client.delete("batch/v1", "jobs", ns, "gone", propagation="Background")

        async def collected():
            return await client.get(WORKLOAD_GV, "workloads", ns, wl["metadata"]["name"]) is None
        await eventually(collected, "the garbage collector deleting the Workload")
        # a new Job of the same name gets a new Workload (another uid, another name)
        job2 = await client.create("batch/v1", "jobs", ns, job_body("gone"))
        wl2 = await admitted_and_running(client, ns, job2)
        assert wl2["metadata"]["name"] == workload_name("gone", job2["metadata"]["uid"])
        assert [w["metadata"]["name"] for w in await workloads(client, ns)] == [wl2["metadata"]["name"]]
    run(cluster, body)


@needs_node
def test_cluster_kueue_flag(tmp_path):
    from testcluster import Cluster

    with Cluster(tmp_path / "off") as cluster:
        assert cluster.kueue is None
    with Cluster(tmp_path / "on", kueue=True) as cluster:
        assert cluster.kueue is not None and cluster.kueue.ready.is_set()
        cluster.namespace("ns")
        job = cluster.api.call("POST", "/apis/batch/v1/namespaces/ns/jobs", job_body("x", code="print(1)"))
        cluster.wait(lambda: [w for w in cluster.server.objects(WORKLOAD_GV, "workloads", "ns")
                              if is_true(w, "Finished")
                              and w["metadata"]["labels"][JOB_UID_LABEL] == job["metadata"]["uid"]],
                     60, "the Workload finished")
        kueue = cluster.kueue
    assert kueue._thread is not None and not kueue._thread.is_alive()
