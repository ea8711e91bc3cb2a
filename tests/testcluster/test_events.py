"""Events written by the stand-in's components over real HTTP, as a real cluster's: the Job controller's
FailedCreate/SuccessfulCreate (a Job whose pods a ResourceQuota refuses), the scheduler's
FailedScheduling, the kubelet's FailedMount, image-pull Failed/BackOff and CreateContainerConfigError."""
from __future__ import annotations

import asyncio
import itertools
import os

import pytest

from testcluster import ApiServer
from testcluster.client import Client
from testcluster.events import EventRecorder
from testcluster.jobcontroller import JobController

from .apiserver_helpers import eventually

PY = "testcluster/python:3.11"
_ns = itertools.count()
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the node's sandbox needs root (mount namespaces)")


async def events(client: Client, ns: str, name: str, reason: str | None = None) -> list[dict]:
    selector = f"involvedObject.name={name}" + (f",reason={reason}" if reason else "")
    items, _ = await client.list("v1", "events", ns, field_selector=selector)
    return items


def job_body(name: str, cpu: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {
        "completions": 2, "parallelism": 2, "template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "main", "image": "busybox", "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}}]}}}}


# ---- the Job controller ----------------------------------------------------------------------------------------------

def test_a_job_over_quota_gets_failed_create_events_then_its_pods():
    async def main(server):
        ctl = JobController(server.url, api_backoff=(0.2, 1.0), batch_period=0.1)
        task = asyncio.create_task(ctl.run())
        ns = f"ev-{next(_ns)}"
        async with Client(server.url) as client:
            try:
                await client.create("v1", "namespaces", None, {"metadata": {"name": ns}})
                await client.create("v1", "resourcequotas", ns, {"metadata": {"name": "compute"},
                                                                 "spec": {"hard": {"requests.cpu": "100m"}}})
                job = await client.create("batch/v1", "jobs", ns, job_body("train", "500m"))
                failed = await eventually(lambda: events(client, ns, "train", "FailedCreate"), what="FailedCreate")
                ev = failed[0]
                assert ev["type"] == "Warning" and ev["source"]["component"] == "job-controller"
                assert ev["involvedObject"]["kind"] == "Job" and ev["involvedObject"]["uid"] == job["metadata"]["uid"]
                assert ev["involvedObject"]["namespace"] == ns and ev["count"] >= 1
                assert ev["firstTimestamp"] and ev["lastTimestamp"]
                assert ev["message"].startswith('Error creating: pods "train-')
                assert ev["message"].endswith("is forbidden: exceeded quota: compute, requested: requests.cpu=500m, "
                                              "used: requests.cpu=0, limited: requests.cpu=100m")
                # retried with back-off: the same Event's count goes up (or new ones for new generated names)
                await eventually(lambda: _more(client, ns), what="retries")
                pods, _ = await client.list("v1", "pods", ns)
                assert pods == []
                status = (await client.get("batch/v1", "jobs", ns, "train")).get("status") or {}
                assert not status.get("conditions")  # no condition: only the Events tell
                await client.patch("v1", "resourcequotas", ns, "compute", {"spec": {"hard": {"requests.cpu": "2"}}})
                pods = await eventually(lambda: _pods(client, ns, 2), what="pods once the quota is raised")
                wanted = {f"Created pod: {p['metadata']['name']}" for p in pods}
                created = await eventually(lambda: _has_messages(client, ns, wanted), what="SuccessfulCreate")
                assert all(e["type"] == "Normal" for e in created)
                quota = await client.get("v1", "resourcequotas", ns, "compute")
                assert quota["status"]["used"] == {"requests.cpu": "1"}
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    with ApiServer(crds_dir=None) as server:
        asyncio.run(main(server))


async def _more(client, ns):
    items = await events(client, ns, "train", "FailedCreate")
    return sum(e["count"] for e in items) >= 2


async def _pods(client, ns, n):
    pods, _ = await client.list("v1", "pods", ns)
    return pods if len(pods) >= n else None


async def _has_messages(client, ns, wanted):
    items = await events(client, ns, "train", "SuccessfulCreate")
    return items if wanted <= {e["message"] for e in items} else None


def test_a_job_with_a_missing_service_account_gets_failed_create():
    async def main(server):
        ctl = JobController(server.url, api_backoff=(0.2, 1.0), batch_period=0.1)
        task = asyncio.create_task(ctl.run())
        ns = f"ev-{next(_ns)}"
        async with Client(server.url) as client:
            try:
                await client.create("v1", "namespaces", None, {"metadata": {"name": ns}})
                body = job_body("sa", "100m")
                body["spec"]["template"]["spec"]["serviceAccountName"] = "trainer"
                await client.create("batch/v1", "jobs", ns, body)
                failed = await eventually(lambda: events(client, ns, "sa", "FailedCreate"))
                assert failed[0]["message"] == (f'Error creating: pods "sa-" is forbidden: error looking up service '
                                                f'account {ns}/trainer: serviceaccount "trainer" not found')
                await client.create("v1", "serviceaccounts", ns, {"metadata": {"name": "trainer"}})
                await eventually(lambda: _pods(client, ns, 2), what="pods once the ServiceAccount exists")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    with ApiServer(crds_dir=None) as server:
        asyncio.run(main(server))


def test_the_recorder_aggregates_and_rate_limits():
    async def main(server):
        ns = f"ev-{next(_ns)}"
        async with Client(server.url) as client:
            await client.create("v1", "namespaces", None, {"metadata": {"name": ns}})
            cm = await client.create("v1", "configmaps", ns, {"metadata": {"name": "target"}, "data": {}})
            rec = EventRecorder(client, "tester", host="h1")
            for _ in range(30):
                rec.event(cm, "Warning", "Looping", "the same problem again")
            rec.event(cm, "Normal", "Other", "another message")
            await rec.flush()
            items = await events(client, ns, "target")
            by_reason = {e["reason"]: e for e in items}
            assert len(items) == 2
            assert by_reason["Looping"]["count"] == 25  # the spam filter's burst; the rest dropped
            assert by_reason["Other"]["count"] == 1 and by_reason["Other"]["source"] == {"component": "tester",
                                                                                         "host": "h1"}
            assert by_reason["Looping"]["involvedObject"]["kind"] == "ConfigMap"
            assert rec.dropped == 5
            # the events.k8s.io view of the same storage
            new = await client.get("events.k8s.io/v1", "events", ns, by_reason["Other"]["metadata"]["name"])
            assert new["note"] == "another message" and new["regarding"]["name"] == "target"
            await rec.close()

    with ApiServer(crds_dir=None) as server:
        asyncio.run(main(server))


# ---- the scheduler and the kubelet -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the node's sandbox needs root (mount namespaces)")
    from testcluster.kubelet import Node
    from testcluster.podnet import PodNetwork

    root = tmp_path_factory.mktemp("node")
    with PodNetwork.create("node-1") as net, ApiServer() as server:
        server.listen(net.gateway)
        with Node(server.url, root, restart_backoff=(0.3, 1.0), pull_backoff=(0.3, 1.0), retry_seconds=0.2,
                  network=net) as node:
            yield server, node


def run(cluster, body):
    server = cluster[0]
    ns = f"evk-{next(_ns)}"

    async def main():
        async with Client(server.url) as client:
            await client.create("v1", "namespaces", None, {"metadata": {"name": ns}})
            return await body(client, ns)
    return asyncio.run(main())


def python_pod(name, code="pass", **spec):
    container = {"name": "main", "image": PY, "command": ["python3", "-c", code]}
    container.update(spec.pop("container", {}))
    return {"metadata": {"name": name}, "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


def waiting_reason(pod) -> str | None:
    for s in (pod.get("status") or {}).get("containerStatuses") or []:
        return ((s.get("state") or {}).get("waiting") or {}).get("reason")
    return None


@needs_root
def test_a_missing_config_map_volume_gives_failed_mount(cluster):
    async def body(client, ns):
        pod = python_pod("mnt", volumes=[{"name": "cfg", "configMap": {"name": "settings"}}],
                         container={"volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}]})
        await client.create("v1", "pods", ns, pod)
        ev = (await eventually(lambda: events(client, ns, "mnt", "FailedMount")))[0]
        assert ev["type"] == "Warning" and ev["source"] == {"component": "kubelet", "host": "node-1"}
        assert ev["message"] == 'MountVolume.SetUp failed for volume "cfg" : configmap "settings" not found'
        assert ev["involvedObject"]["kind"] == "Pod" and ev["involvedObject"]["apiVersion"] == "v1"
        # retried: the one Event's count goes up, and the pod stays ContainerCreating
        await eventually(lambda: _count_at_least(client, ns, "mnt", "FailedMount", 3))
        assert len(await events(client, ns, "mnt", "FailedMount")) == 1
        pod = await client.get("v1", "pods", ns, "mnt")
        assert pod["status"]["phase"] == "Pending" and waiting_reason(pod) == "ContainerCreating"
        await client.create("v1", "configmaps", ns, {"metadata": {"name": "settings"}, "data": {"k": "v"}})
        await eventually(lambda: _phase(client, ns, "mnt", "Succeeded"), what="runs once the configMap exists")
    run(cluster, body)


@needs_root
def test_an_image_pull_failure_gives_failed_and_back_off(cluster):
    async def body(client, ns):
        image = "example.com/nope:1"
        await client.create("v1", "pods", ns, python_pod("img", container={"image": image}))

        async def seen():
            items = await events(client, ns, "img")
            got = {(e["type"], e["reason"], e["message"]) for e in items}
            return got if {("Normal", "BackOff", f'Back-off pulling image "{image}"'),
                           ("Warning", "Failed", "Error: ImagePullBackOff"),
                           ("Warning", "Failed", "Error: ErrImagePull")} <= got else None
        got = await eventually(seen, what="image pull events")
        pulls = [m for t, r, m in got if m.startswith(f'Failed to pull image "{image}": ')]
        assert pulls and "not found" in pulls[0]
        items = await events(client, ns, "img", "BackOff")
        assert items[0]["involvedObject"]["fieldPath"] == "spec.containers{main}"
    run(cluster, body)


@needs_root
def test_a_missing_secret_in_env_gives_create_container_config_error(cluster):
    async def body(client, ns):
        env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}]
        await client.create("v1", "pods", ns, python_pod("cfg", container={"env": env}))
        items = await eventually(lambda: events(client, ns, "cfg", "Failed"))
        assert items[0]["message"] == 'Error: secret "creds" not found' and items[0]["type"] == "Warning"
        pod = await client.get("v1", "pods", ns, "cfg")
        assert waiting_reason(pod) == "CreateContainerConfigError"
    run(cluster, body)


@needs_root
def test_an_unschedulable_pod_gets_failed_scheduling(cluster):
    async def body(client, ns):
        await client.create("v1", "pods", ns, python_pod("big", container={"resources": {"requests": {"cpu": "64"}}}))
        items = await eventually(lambda: events(client, ns, "big", "FailedScheduling"))
        pod = await client.get("v1", "pods", ns, "big")
        cond = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
        assert items[0]["message"] == cond["message"] == (
            "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption "
            "victims found for incoming pod.")
        assert items[0]["type"] == "Warning" and items[0]["source"]["component"] == "default-scheduler"
        await client.create("v1", "pods", ns, python_pod("small"))
        await eventually(lambda: _phase(client, ns, "small", "Succeeded"))
        scheduled = await eventually(lambda: events(client, ns, "small", "Scheduled"))
        assert scheduled[0]["message"] == f"Successfully assigned {ns}/small to node-1"
    run(cluster, body)


async def _count_at_least(client, ns, name, reason, n):
    return sum(e["count"] for e in await events(client, ns, name, reason)) >= n


async def _phase(client, ns, name, phase):
    pod = await client.get("v1", "pods", ns, name)
    return pod is not None and (pod.get("status") or {}).get("phase") == phase
