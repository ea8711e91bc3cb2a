"""The node stand-in under API faults (the API server's injected 5xx and delays): no failed or delayed call
wedges a pod; every step of a pod worker is retried, as the kubelet's next sync would.

Before the fix, one 500 on the GET of a pod's configMap left the pod Pending in ContainerCreating forever
(the worker died; the fault soak's stall), one 500 on a status PATCH froze its status, one 503 on the final
DELETE left it Terminating, and a 500 on the Node's PATCH stopped NodeLost half-way."""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from testcluster import ApiServer
from testcluster.client import Client
from testcluster.kubelet import Node
from testcluster.podnet import PodNetwork

PY = "testcluster/python:3.11"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the node's sandbox needs root (mount namespaces)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("node")
    with PodNetwork.create("node-1") as net, ApiServer() as server:
        server.listen(net.gateway)
        # api_timeout=1: a 2.5 s delay is a timeout of the kubelet's call, as 31 s is with the default 30 s
        with Node(server.url, root, retry_seconds=0.2, api_timeout=1.0, pull_backoff=(0.3, 1.0),
                  network=net) as node:
            yield server, node


_counter = iter(range(10 ** 6))


def python_pod(name, code, container=None, **spec):
    return {"metadata": {"name": name, "labels": spec.pop("labels", {})},
            "spec": {"restartPolicy": "Never", "containers": [
                {"name": "main", "image": PY, "command": ["python3", "-c", code], **(container or {})}], **spec}}


async def wait_pod(client, ns, name, predicate, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    pod = None
    while time.monotonic() < deadline:
        pod = await client.get("v1", "pods", ns, name)
        if pod is not None and predicate(pod):
            return pod
        await asyncio.sleep(0.05)
    raise AssertionError(f"pod {ns}/{name} never matched; last: {pod and pod.get('status')}")


def phase(*phases):
    return lambda pod: (pod.get("status") or {}).get("phase") in phases


def waiting(reason):
    return lambda pod: any((s.get("state") or {}).get("waiting", {}).get("reason") == reason
                           for s in (pod.get("status") or {}).get("containerStatuses") or [])


def cond(pod, type_):
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def terminated(pod):
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def run(cluster, body):
    server = cluster[0]
    ns = f"f{next(_counter)}"

    async def main():
        async with Client(server.url) as client:
            await client.create("v1", "namespaces", None, {"metadata": {"name": ns}})
            return await body(client, ns)
    return asyncio.run(main())


def test_failed_and_delayed_configmap_reads_are_retried(cluster):
    server, node = cluster

    async def body(client, ns):
        await client.create("v1", "configmaps", ns, {"metadata": {"name": "cfg"}, "data": {"greeting": "hello"}})
        path = rf"/namespaces/{ns}/configmaps/cfg"
        server.faults.add(500, method="GET", path_regex=path, count=2)
        server.faults.add_delay(2.5, method="GET", path_regex=path, count=1)  # > api_timeout: a timeout
        server.faults.add(503, method="GET", path_regex=path, count=1)  # the env read, once the volume is up
        pod = python_pod("p", "import os; print(open('/etc/cfg/greeting').read(), os.environ['G'])", container={
            "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}],
            "env": [{"name": "G", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}}]},
            volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}])
        await client.create("v1", "pods", ns, pod)
        done = await wait_pod(client, ns, "p", phase("Succeeded", "Failed"), timeout=30)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        assert node.logs(ns, "p").split() == ["hello", "hello"]
    run(cluster, body)


def test_failed_status_writes_are_made_again(cluster):
    server, _ = cluster

    async def body(client, ns):
        status = rf"/namespaces/{ns}/pods/p/status"
        server.faults.add(500, method="PATCH", path_regex=status, count=3)  # the first writes, ContainerCreating
        await client.create("v1", "pods", ns, python_pod("p", "import time; time.sleep(1.5)"))
        await wait_pod(client, ns, "p", phase("Running"), timeout=30)
        server.faults.add(503, method="PATCH", path_regex=status, count=3)  # the terminal status
        done = await wait_pod(client, ns, "p", phase("Succeeded", "Failed"), timeout=30)
        assert done["status"]["phase"] == "Succeeded" and terminated(done)["exitCode"] == 0
        assert cond(done, "Ready")["reason"] == "PodCompleted"
    run(cluster, body)


def test_the_final_delete_is_retried(cluster):
    server, _ = cluster

    async def body(client, ns):
        stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(60)"
        await client.create("v1", "pods", ns, python_pod("p", stubborn, terminationGracePeriodSeconds=2))
        await wait_pod(client, ns, "p", phase("Running"), timeout=30)
        await asyncio.sleep(0.3)  # its SIGTERM handler is installed
        await client.delete("v1", "pods", ns, "p")
        server.faults.add(503, method="DELETE", path_regex=rf"/namespaces/{ns}/pods/p", count=3)
        deadline = time.monotonic() + 20
        while (pod := await client.get("v1", "pods", ns, "p")) is not None:
            assert time.monotonic() < deadline, f"still there: {pod['metadata']} {pod['status'].get('phase')}"
            await asyncio.sleep(0.1)
        assert server.faults.injected["503"] >= 3
    run(cluster, body)


def test_a_config_error_from_a_failed_read_recovers(cluster):
    """A read failing when a container starts (after the volumes) shows as CreateContainerConfigError, then
    the container runs."""
    server, _ = cluster

    async def body(client, ns):
        await client.create("v1", "secrets", ns, {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
        env = [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
        pod = python_pod("p", "import os; print(os.environ['K'])", container={"env": env}, initContainers=[
            {"name": "init", "image": PY, "command": ["python3", "-c", "import time; time.sleep(1)"]}])
        await client.create("v1", "pods", ns, pod)
        await wait_pod(client, ns, "p", lambda p: "running" in (
            ((p.get("status") or {}).get("initContainerStatuses") or [{}])[0].get("state") or {}))
        server.faults.add(500, method="GET", path_regex=rf"/namespaces/{ns}/secrets/s", count=3)
        await wait_pod(client, ns, "p", waiting("CreateContainerConfigError"))
        done = await wait_pod(client, ns, "p", phase("Succeeded", "Failed"))
        assert done["status"]["phase"] == "Succeeded", done["status"]
        assert server.faults.injected["500"] >= 3
    run(cluster, body)


def test_image_pull_back_off_for_a_while(cluster):
    """The fault soak's "stuck in ImagePullBackOff for a while": the fate's ``after`` ends it (it used to be
    ignored: the pod waited in ImagePullBackOff forever and its Job stayed active)."""
    _, node = cluster

    async def body(client, ns):
        node.fates.add(lambda p: p["metadata"]["namespace"] == ns, "ImagePullBackOff", after=0.5)
        await client.create("v1", "pods", ns, python_pod("p", "print('pulled')"))
        await wait_pod(client, ns, "p", waiting("ImagePullBackOff"))
        done = await wait_pod(client, ns, "p", phase("Succeeded", "Failed"))
        assert done["status"]["phase"] == "Succeeded" and node.logs(ns, "p").strip() == "pulled"
        assert ("ImagePullBackOff", ns, "p") in node.fates.log
    run(cluster, body)


def test_node_lost_and_recover_through_failing_writes(tmp_path):
    with ApiServer() as server, Node(server.url, tmp_path, retry_seconds=0.2, api_timeout=1.0) as node:
        node.fates.add("app=lost", "NodeLost", after=0.3)

        async def main():
            async with Client(server.url) as client:
                await client.create("v1", "namespaces", None, {"metadata": {"name": "n"}})
                for name in ("a", "b"):
                    await client.create("v1", "pods", "n", python_pod(name, "import time; time.sleep(60)",
                                                                      labels={"app": "lost"} if name == "a" else {}))
                for name in ("a", "b"):
                    await wait_pod(client, "n", name, phase("Running"), timeout=30)
                server.faults.add(500, method="PATCH", path_regex=r"/api/v1/nodes/node-1", count=2)
                server.faults.add(500, method="DELETE", path_regex=r"/namespaces/n/pods/", count=2)
                deadline = time.monotonic() + 20
                while (await client.list("v1", "pods", "n"))[0]:  # both force-deleted by the taint manager
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
                n1 = await client.get("v1", "nodes", None, "node-1")
                assert next(c for c in n1["status"]["conditions"] if c["type"] == "Ready")["status"] == "Unknown"
                assert {t["key"] for t in n1["spec"]["taints"]} == {"node.kubernetes.io/unreachable"}
                server.faults.add(503, method="PATCH", path_regex=r"/api/v1/nodes/node-1", count=2)
                await asyncio.to_thread(node.recover)  # retried through the 503s, not raised
                n1 = await client.get("v1", "nodes", None, "node-1")
                assert next(c for c in n1["status"]["conditions"] if c["type"] == "Ready")["status"] == "True"
                await client.create("v1", "pods", "n", python_pod("c", "pass"))
                await wait_pod(client, "n", "c", phase("Succeeded"), timeout=30)
        asyncio.run(main())
        assert node.fates.applied["NodeLost"] == 1
        assert server.faults.injected["500"] == 4 and server.faults.injected["503"] == 2
