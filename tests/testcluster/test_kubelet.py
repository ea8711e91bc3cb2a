"""The node stand-in against the API server stand-in over real HTTP: pods created directly (no Job
controller) are scheduled, run as real processes in their image's environment, and reported as the
kubelet reports them."""
from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import time
from pathlib import Path

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
        server.listen(net.gateway)  # as Cluster does: pods reach the API server at the gateway
        with Node(server.url, root, restart_backoff=(0.3, 1.0), pull_backoff=(0.3, 1.0), retry_seconds=0.2,
                  network=net) as node:
            yield server, node, root


_counter = iter(range(10 ** 6))


def run(cluster, body):
    """Run ``body(client, namespace)`` in a fresh namespace."""
    server = cluster[0]
    ns = f"t{next(_counter)}"

    async def main():
        async with Client(server.url) as client:
            await client.create("v1", "namespaces", None, {"metadata": {"name": ns}})
            return await body(client, ns)
    return asyncio.run(main())


async def wait_pod(client, ns, name, predicate, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    pod = None
    while time.monotonic() < deadline:
        pod = await client.get("v1", "pods", ns, name)
        if pod is not None and predicate(pod):
            return pod
        await asyncio.sleep(0.05)
    raise AssertionError(f"pod {ns}/{name} never matched; last: {json.dumps(pod, indent=1)[:4000]}")


def phase(*phases):
    return lambda pod: (pod.get("status") or {}).get("phase") in phases


def waiting(reason, init=False):
    key = "initContainerStatuses" if init else "containerStatuses"
    return lambda pod: any((s.get("state") or {}).get("waiting", {}).get("reason") == reason
                           for s in (pod.get("status") or {}).get(key) or [])


def cond(pod, type_):
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def python_pod(name, code, **spec):
    container = {"name": "main", "image": PY, "command": ["python3", "-c", code]}
    container.update(spec.pop("container", {}))
    return {"metadata": {"name": name, "labels": spec.pop("labels", {})},
            "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


def home_of(uid: int) -> str:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return "/"


def terminated(pod, init=False):
    key = "initContainerStatuses" if init else "containerStatuses"
    return pod["status"][key][0]["state"]["terminated"]


# ---- what the process sees ---------------------------------------------------------------------------------

PROBE = r"""
import grp, json, os, socket
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()), "host": socket.gethostname(),
       "cfg": open("/etc/x/greeting").read() + open("/etc/single.txt").read(), "env": {k: os.environ.get(k) for k in ("SECRET", "POD", "NODE", "LABEL", "ARG", "HOME")},
       "argv": os.environ.get("ARGV"), "fqdn": socket.gethostbyname("w-0.workers.%s.svc.cluster.local" % os.environ["NS"]),
       "short": socket.gethostbyname("w-0.workers"), "svc": socket.gethostbyname("workers")}
open("/mnt/pvc/c/written.txt", "w").write("from the pod")
for path in ("/usr/local/x", "/etc/x/new", "/tmp/ok"):
    try:
        open(path, "w").write("x")
        out[path] = "ok"
    except OSError as err:
        out[path] = err.errno
out["token"] = os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token")
print(json.dumps(out))
"""


def test_a_pod_sees_its_volumes_env_and_user(cluster):
    _, node, root = cluster

    async def body(client, ns):
        await client.create("v1", "configmaps", ns, {"metadata": {"name": "cfg"}, "data": {"greeting": "hello"}})
        await client.create("v1", "secrets", ns, {"metadata": {"name": "s"}, "stringData": {"token": "s3cret"}})
        await client.create("v1", "persistentvolumeclaims", ns, {"metadata": {"name": "c"}, "spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
        pvc = root / "pvcs" / ns / "c"
        pvc.mkdir(parents=True)
        (pvc / "input.txt").write_text("pre-populated")
        pod = python_pod("w", PROBE, hostname="w-0", subdomain="workers", labels={"app": "w"},
                         securityContext={"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000},
                         volumes=[{"name": "cfg", "configMap": {"name": "cfg"}},
                                  {"name": "data", "persistentVolumeClaim": {"claimName": "c"}},
                                  {"name": "tmp", "emptyDir": {}}],
                         container={"args": ["$(POD)", "$$(POD)"], "command": ["sh", "-c",
                                    f"ARGV=\"$0 $1\" exec python3 -c '{PROBE}'"],
                                    "env": [{"name": "NS", "value": ns},
                                            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                                            {"name": "LABEL", "valueFrom": {"fieldRef": {
                                                "fieldPath": "metadata.labels['app']"}}},
                                            {"name": "ARG", "value": "$(POD).$(NODE).$(UNDEFINED)"},
                                            {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s",
                                                                                              "key": "token"}}}],
                                    "volumeMounts": [{"name": "cfg", "mountPath": "/etc/x"},
                                                     {"name": "cfg", "mountPath": "/etc/single.txt",
                                                      "subPath": "greeting"},
                                                     {"name": "data", "mountPath": "/mnt/pvc/c"},
                                                     {"name": "tmp", "mountPath": "/tmp"}],
                                    "securityContext": {"readOnlyRootFilesystem": True,
                                                        "allowPrivilegeEscalation": False,
                                                        "capabilities": {"drop": ["ALL"]}}})
        await client.create("v1", "services", ns, {"metadata": {"name": "workers"}, "spec": {
            "clusterIP": "None", "selector": {"app": "w"}, "publishNotReadyAddresses": True,
            "ports": [{"port": 80}]}})
        await client.create("v1", "pods", ns, pod)
        done = await wait_pod(client, ns, "w", phase("Succeeded", "Failed"))
        text = node.logs(ns, "w", "main")
        assert done["status"]["phase"] == "Succeeded", text
        out = json.loads(text.strip().splitlines()[-1])
        assert (out["uid"], out["gid"], out["groups"]) == (1000, 1000, [2000])
        ip = done["status"]["podIP"]
        assert out["host"] == "w-0" and out["fqdn"] == out["short"] == out["svc"] == ip
        assert out["cfg"] == "hellohello"
        assert out["env"] == {"SECRET": "s3cret", "POD": "w", "NODE": "node-1", "LABEL": "w",
                              "ARG": "w.node-1.$(UNDEFINED)", "HOME": home_of(1000)}
        assert out["argv"] == "w $(POD)"  # $(VAR) expanded in args, $$ escapes
        assert out["/usr/local/x"] == 30 and out["/etc/x/new"] == 30 and out["/tmp/ok"] == "ok"
        assert out["token"] is True  # automountServiceAccountToken defaults to true
        assert (pvc / "written.txt").read_text() == "from the pod"
        assert os.stat(pvc).st_gid == 2000  # fsGroup ownership of the claim
        assert ipaddress.ip_address(ip) in node.network.cidr and ip != node.network.gateway
        assert done["status"]["podIPs"] == [{"ip": ip}] and done["status"]["startTime"]
        assert done["status"]["hostIP"] == node.network.gateway
        assert await client.read_log(ns, "w", "main") == text
    run(cluster, body)


def test_the_operator_and_trainer_images_run_their_python(cluster):
    """Pods of the real images: their env sits at /opt/venv, as the Dockerfile's USER, /tmp an emptyDir."""
    _, node, _ = cluster
    from testcluster import images

    async def body(client, ns):
        for image, module in (("operator", "kopf"), ("trainer-cpu", "safetensors")):
            if not images.is_built(image):
                pytest.skip(f"{image} env not built (python -m testcluster.images build)")
            pod = python_pod(image, f"import {module}, os, sys; print(sys.prefix, os.getuid(), {module}.__name__)",
                             securityContext={"runAsNonRoot": True},
                             volumes=[{"name": "tmp", "emptyDir": {}}],
                             container={"image": f"ghcr.io/branchmerge/{image}:0.1.0", "command": ["python", "-c",
                                        f"import {module}, os, sys; print(sys.prefix, os.getuid(), {module}.__name__)"],
                                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                                        "securityContext": {"readOnlyRootFilesystem": True}})
            await client.create("v1", "pods", ns, pod)
        for image, uid, module in (("operator", 65532, "kopf"), ("trainer-cpu", 1000, "safetensors")):
            done = await wait_pod(client, ns, image, phase("Succeeded", "Failed"), timeout=60)
            assert done["status"]["phase"] == "Succeeded", node.logs(ns, image)
            assert node.logs(ns, image).split()[-3:] == ["/opt/venv", str(uid), module]
            assert done["status"]["containerStatuses"][0]["imageID"].startswith(f"ghcr.io/branchmerge/{image}@sha256:")
        # the CUDA image is not pullable here unless a test maps it to trainer-cpu
        node.image_map["ghcr.io/branchmerge/trainer"] = "trainer-cpu"
        try:
            await client.create("v1", "pods", ns, python_pod("mapped", "", container={
                "image": "ghcr.io/branchmerge/trainer:0.1.0", "command": ["sh", "-c", "echo $DS_ACCELERATOR"]}))
            done = await wait_pod(client, ns, "mapped", phase("Succeeded", "Failed"), timeout=60)
        finally:
            del node.image_map["ghcr.io/branchmerge/trainer"]
        assert done["status"]["phase"] == "Succeeded" and node.logs(ns, "mapped").strip() == "cpu"
    run(cluster, body)


# ---- container outcomes ---------------------------------------------------------------------------------------

def test_termination_messages(cluster):
    async def body(client, ns):
        await client.create("v1", "pods", ns, python_pod(
            "msg", "open('/dev/termination-log', 'w').write('result: ' + 'x' * 5000)"))
        await client.create("v1", "pods", ns, python_pod(
            "custom", "open('/tmp/out', 'w').write('custom path'); raise SystemExit(3)",
            container={"terminationMessagePath": "/tmp/out"}))
        await client.create("v1", "pods", ns, python_pod(
            "fallback", "import sys\nfor i in range(100): print('line', i)\nsys.exit(4)",
            container={"terminationMessagePolicy": "FallbackToLogsOnError"}))
        await client.create("v1", "pods", ns, python_pod(
            "nofallback", "print('only in the log'); raise SystemExit(5)"))
        msg = terminated(await wait_pod(client, ns, "msg", phase("Succeeded")))
        assert msg["reason"] == "Completed" and msg["exitCode"] == 0
        assert msg["message"] == ("result: " + "x" * 5000)[:4096]
        custom = terminated(await wait_pod(client, ns, "custom", phase("Failed")))
        assert (custom["exitCode"], custom["reason"], custom["message"]) == (3, "Error", "custom path")
        fallback = terminated(await wait_pod(client, ns, "fallback", phase("Failed")))
        lines = fallback["message"].splitlines()
        assert lines[-1] == "line 99" and len(lines) <= 80 and len(fallback["message"]) <= 2048
        nofallback = terminated(await wait_pod(client, ns, "nofallback", phase("Failed")))
        assert "message" not in nofallback and nofallback["exitCode"] == 5
    run(cluster, body)


def test_init_container_failure_fails_the_pod(cluster):
    async def body(client, ns):
        pod = python_pod("p", "print('never')")
        pod["spec"]["initContainers"] = [
            {"name": "first", "image": PY, "command": ["python3", "-c", "open('/work/ok', 'w').write('1')"],
             "volumeMounts": [{"name": "w", "mountPath": "/work"}]},
            {"name": "second", "image": PY, "command": ["sh", "-c", "test -f /work/ok && exit 9"],
             "volumeMounts": [{"name": "w", "mountPath": "/work"}]}]
        pod["spec"]["volumes"] = [{"name": "w", "emptyDir": {}}]
        await client.create("v1", "pods", ns, pod)
        done = await wait_pod(client, ns, "p", phase("Failed"))
        init = done["status"]["initContainerStatuses"]
        assert init[0]["state"]["terminated"]["exitCode"] == 0
        assert init[1]["state"]["terminated"]["exitCode"] == 9  # saw the first one's file in the shared volume
        assert done["status"]["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}
        initialized = cond(done, "Initialized")
        assert initialized["status"] == "False" and initialized["reason"] == "ContainersNotInitialized"
        assert initialized["message"] == "containers with incomplete status: [second]"
    run(cluster, body)


def test_on_failure_restarts_in_place_with_backoff(cluster):
    async def body(client, ns):
        code = ("import pathlib; p = pathlib.Path('/w/n'); n = int(p.read_text()) if p.exists() else 0; "
                "p.write_text(str(n + 1)); raise SystemExit(0 if n >= 2 else 1)")
        pod = python_pod("p", code, restartPolicy="OnFailure", volumes=[{"name": "w", "emptyDir": {}}],
                         container={"volumeMounts": [{"name": "w", "mountPath": "/w"}]})
        await client.create("v1", "pods", ns, pod)
        backoff = await wait_pod(client, ns, "p", waiting("CrashLoopBackOff"))
        state = backoff["status"]["containerStatuses"][0]
        assert state["state"]["waiting"]["message"].startswith("back-off ")
        assert state["lastState"]["terminated"]["exitCode"] == 1 and backoff["status"]["phase"] == "Running"
        done = await wait_pod(client, ns, "p", phase("Succeeded"))
        status = done["status"]["containerStatuses"][0]
        assert status["restartCount"] == 2 and status["lastState"]["terminated"]["exitCode"] == 1
    run(cluster, body)


# ---- errors before the start -------------------------------------------------------------------------------------

def test_config_errors_wait_and_recover(cluster):
    async def body(client, ns):
        await client.create("v1", "pods", ns, python_pod("p", "import os; print(os.environ['K'])", container={
            "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k"}}}]}))
        pod = await wait_pod(client, ns, "p", waiting("CreateContainerConfigError"))
        assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"] == 'secret "missing" not found'
        assert pod["status"]["phase"] == "Pending"
        await client.create("v1", "secrets", ns, {"metadata": {"name": "missing"}, "data": {"other": "eA=="}})
        pod = await wait_pod(client, ns, "p", lambda p: "couldn't find key" in json.dumps(p["status"]))
        assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"] == \
            f"couldn't find key k in Secret {ns}/missing"
        await client.patch("v1", "secrets", ns, "missing", {"data": {"k": base64.b64encode(b"v").decode()}})
        await wait_pod(client, ns, "p", phase("Succeeded"))
        # runAsNonRoot with an image whose USER is root and no runAsUser
        await client.create("v1", "pods", ns, python_pod("root", "pass", securityContext={"runAsNonRoot": True}))
        pod = await wait_pod(client, ns, "root", waiting("CreateContainerConfigError"))
        message = pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        assert message.startswith("container has runAsNonRoot and image will run as root (pod: \"root_")
    run(cluster, body)


def test_unknown_images_back_off(cluster):
    async def body(client, ns):
        for name, image in (("nope", "example.com/nope:1"), ("cuda", "ghcr.io/branchmerge/trainer:0.1.0")):
            await client.create("v1", "pods", ns, python_pod(name, "pass", container={"image": image}))
        for name, image in (("nope", "example.com/nope:1"), ("cuda", "ghcr.io/branchmerge/trainer:0.1.0")):
            pod = await wait_pod(client, ns, name, waiting("ErrImagePull"))
            assert f'failed to pull and unpack image "{image}"' in \
                pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
            pod = await wait_pod(client, ns, name, waiting("ImagePullBackOff"))
            assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"] == \
                f'Back-off pulling image "{image}"'
            assert pod["status"]["phase"] == "Pending"
    run(cluster, body)


def test_a_missing_executable_is_a_start_error(cluster):
    async def body(client, ns):
        await client.create("v1", "pods", ns, python_pod("p", "", container={"command": ["no-such-tool"]}))
        state = terminated(await wait_pod(client, ns, "p", phase("Failed")))
        assert state["exitCode"] == 128 and state["reason"] == "StartError"
        assert 'exec: "no-such-tool": executable file not found in $PATH' in state["message"]
    run(cluster, body)


# ---- scheduling ----------------------------------------------------------------------------------------------------

def test_the_scheduler_explains_what_does_not_fit(cluster):
    async def body(client, ns):
        gpu = python_pod("gpu", "pass", container={"resources": {"limits": {"nvidia.com/gpu": "1"}}})
        await client.create("v1", "pods", ns, gpu)
        sel = python_pod("sel", "pass", nodeSelector={"pool": "big"})
        await client.create("v1", "pods", ns, sel)
        cpu = python_pod("cpu", "pass", container={"resources": {"requests": {"cpu": "3", "memory": "1Gi"}}})
        await client.create("v1", "pods", ns, cpu)
        claim = python_pod("claim", "pass", volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "later"}}])
        await client.create("v1", "pods", ns, claim)
        expected = {
            "gpu": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available: "
                   "1 No preemption victims found for incoming pod.",
            "sel": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/1 "
                   "nodes are available: 1 Preemption is not helpful for scheduling.",
            "cpu": "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No "
                   "preemption victims found for incoming pod.",
            "claim": '0/1 nodes are available: persistentvolumeclaim "later" not found. preemption: 0/1 nodes are '
                     'available: 1 Preemption is not helpful for scheduling.'}
        for name, message in expected.items():
            pod = await wait_pod(client, ns, name, lambda p: cond(p, "PodScheduled") is not None)
            scheduled = cond(pod, "PodScheduled")
            assert (scheduled["status"], scheduled["reason"], scheduled["message"]) == ("False", "Unschedulable",
                                                                                        message)
            assert not pod["spec"].get("nodeName")
        await client.create("v1", "persistentvolumeclaims", ns, {"metadata": {"name": "later"}, "spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
        done = await wait_pod(client, ns, "claim", phase("Succeeded"))  # retried when the claim appears
        assert done["spec"]["nodeName"] == "node-1" and cond(done, "PodScheduled")["status"] == "True"
    run(cluster, body)


# ---- probes ----------------------------------------------------------------------------------------------------------

def test_exec_readiness_probe_gates_ready(cluster):
    async def body(client, ns):
        code = "import time, pathlib; time.sleep(0.5); pathlib.Path('/w/ready').touch(); time.sleep(30)"
        pod = python_pod("p", code, volumes=[{"name": "w", "emptyDir": {}}], terminationGracePeriodSeconds=1,
                         container={"volumeMounts": [{"name": "w", "mountPath": "/w"}],
                                    "readinessProbe": {"exec": {"command": ["test", "-f", "/w/ready"]},
                                                       "periodSeconds": 0.2}})
        await client.create("v1", "pods", ns, pod)
        running = await wait_pod(client, ns, "p", phase("Running"))
        assert cond(running, "Ready")["status"] == "False"
        ready = await wait_pod(client, ns, "p", lambda p: (cond(p, "Ready") or {}).get("status") == "True")
        assert ready["status"]["containerStatuses"][0]["ready"] is True
        await client.delete("v1", "pods", ns, "p")
    run(cluster, body)


# ---- deletion --------------------------------------------------------------------------------------------------------

def test_graceful_deletion_sigterm_then_sigkill(cluster):
    _, node, _ = cluster

    async def body(client, ns):
        polite = ("import signal, sys, time\n"
                  "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(0)))\n"
                  "print('up', flush=True); time.sleep(60)")
        stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    "print('up', flush=True); time.sleep(60)")
        await client.create("v1", "pods", ns, python_pod("polite", polite, terminationGracePeriodSeconds=30))
        await client.create("v1", "pods", ns, python_pod("stubborn", stubborn, terminationGracePeriodSeconds=1))
        for name in ("polite", "stubborn"):
            await wait_pod(client, ns, name, phase("Running"))
        await asyncio.sleep(0.3)  # both printed "up" and installed their handlers
        t0 = time.monotonic()
        deleted = await client.delete("v1", "pods", ns, "polite")
        assert deleted["metadata"]["deletionTimestamp"] and deleted["metadata"]["deletionGracePeriodSeconds"] == 30
        await client.delete("v1", "pods", ns, "stubborn")
        for name in ("polite", "stubborn"):
            while await client.get("v1", "pods", ns, name) is not None:
                assert time.monotonic() - t0 < 15
                await asyncio.sleep(0.05)
        assert "got SIGTERM" in node.logs(ns, "polite")
        assert time.monotonic() - t0 >= 1.0  # the stubborn one waited for its grace period
    run(cluster, body)


def test_a_pod_deleted_while_it_starts_is_gone_within_its_grace_period(cluster):
    """The deletion can arrive at any point of the pod's start (volumes, sandbox, the container's process just
    being started): the kubelet must still stop whatever it started and finish the deletion in time. Before,
    a process started after the deletion arrived was missed and the pod stayed Terminating for grace + 30 s."""
    _, node, _ = cluster
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)"

    async def body(client, ns):
        for i, delay in enumerate((0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8)):
            name = f"early-{i}"
            await client.create("v1", "pods", ns, python_pod(name, code, terminationGracePeriodSeconds=2))
            await asyncio.sleep(delay)
            t0 = time.monotonic()
            await client.delete("v1", "pods", ns, name)
            while await client.get("v1", "pods", ns, name) is not None:
                assert time.monotonic() - t0 < 2 + 6, f"{name} (deleted {delay}s after creation) still there"
                await asyncio.sleep(0.05)
    run(cluster, body)


def test_watching_a_graceful_delete_sees_the_terminal_status(cluster):
    async def body(client, ns):
        await client.create("v1", "pods", ns, python_pod("p", "import time; time.sleep(60)",
                                                         terminationGracePeriodSeconds=1))
        await wait_pod(client, ns, "p", phase("Running"))
        _, rv = await client.list("v1", "pods", ns)
        await client.delete("v1", "pods", ns, "p")
        seen = []
        async for type_, obj in client.watch("v1", "pods", ns, resource_version=rv, timeout_seconds=10):
            if type_ in ("MODIFIED", "DELETED"):
                seen.append((type_, obj["status"].get("phase")))
            if type_ == "DELETED":
                break
        assert seen[-1] == ("DELETED", "Failed")  # SIGTERM'd: exit 143, terminal phase written before removal
    run(cluster, body)


# ---- fates ------------------------------------------------------------------------------------------------------------

def test_fates_oom_evicted_preempted(cluster):
    _, node, _ = cluster

    async def body(client, ns):
        node.fates.add(f"fate=oom,ns={ns}", "OOMKilled", after=0.3)
        node.fates.add(f"fate=evict,ns={ns}", "Evicted", after=0.3)
        node.fates.add(f"fate=preempt,ns={ns}", "Preempted", after=0.3)
        _, rv = await client.list("v1", "pods", ns)

        async def preempt_events():
            out = []
            async for type_, obj in client.watch("v1", "pods", ns, resource_version=rv, timeout_seconds=20,
                                                 field_selector="metadata.name=preempt"):
                out.append((type_, obj))
                if type_ == "DELETED":
                    return out
        watching = asyncio.create_task(preempt_events())
        for name in ("oom", "evict", "preempt"):
            await client.create("v1", "pods", ns, python_pod(name, "import time; time.sleep(60)",
                                                             labels={"fate": name, "ns": ns},
                                                             terminationGracePeriodSeconds=1))
        oom = await wait_pod(client, ns, "oom", phase("Failed"))
        assert terminated(oom)["exitCode"] == 137 and terminated(oom)["reason"] == "OOMKilled"
        evicted = await wait_pod(client, ns, "evict", phase("Failed"))
        assert evicted["status"]["reason"] == "Evicted"
        assert evicted["status"]["message"] == "The node was low on resource: memory."
        target = cond(evicted, "DisruptionTarget")
        assert (target["status"], target["reason"]) == ("True", "TerminationByKubelet")
        events = await asyncio.wait_for(watching, 20)
        marked = [obj for _, obj in events if cond(obj, "DisruptionTarget")]
        assert marked and cond(marked[0], "DisruptionTarget")["reason"] == "PreemptionByScheduler"
        assert not marked[0]["metadata"].get("deletionTimestamp")  # marked first, then deleted
        assert events[-1][0] == "DELETED" and events[-1][1]["status"]["phase"] == "Failed"
        assert node.fates.applied["OOMKilled"] >= 1 and node.fates.applied["Evicted"] >= 1
        assert ("Preempted", ns, "preempt") in node.fates.log
    run(cluster, body)


def test_fates_before_running(cluster):
    _, node, _ = cluster

    async def body(client, ns):
        node.fates.add(lambda p: p["metadata"]["name"] == f"pull-{ns}", "ImagePullBackOff")
        node.fates.add(lambda p: p["metadata"]["name"] == f"never-{ns}", "NeverScheduled")
        node.fates.add(lambda p: p["metadata"]["name"] == f"later-{ns}", "Unschedulable", after=1.0)
        for name in ("pull", "never", "later"):
            await client.create("v1", "pods", ns, python_pod(f"{name}-{ns}", "pass"))
        await wait_pod(client, ns, f"pull-{ns}", waiting("ImagePullBackOff"))
        later = await wait_pod(client, ns, f"later-{ns}", lambda p: cond(p, "PodScheduled") is not None)
        assert "Insufficient nvidia.com/gpu" in cond(later, "PodScheduled")["message"]
        await wait_pod(client, ns, f"later-{ns}", phase("Succeeded"))  # scheduled once the fate's time passed
        never = await client.get("v1", "pods", ns, f"never-{ns}")
        assert never["status"]["phase"] == "Pending" and not never["status"].get("conditions")
        assert not never["spec"].get("nodeName")
        assert {"ImagePullBackOff", "NeverScheduled", "Unschedulable"} <= set(node.fates.applied)
    run(cluster, body)


def test_node_lost(tmp_path):
    with ApiServer() as server, Node(server.url, tmp_path, retry_seconds=0.2) as node:
        node.fates.add("app=lost", "NodeLost", after=0.3)

        async def main():
            async with Client(server.url) as client:
                await client.create("v1", "namespaces", None, {"metadata": {"name": "n"}})
                await client.create("v1", "pods", "n", python_pod("a", "import time; time.sleep(60)",
                                                                  labels={"app": "lost"}))
                await client.create("v1", "pods", "n", python_pod("b", "import time; time.sleep(60)"))
                await wait_pod(client, "n", "a", phase("Running"))
                deadline = time.monotonic() + 15
                while (await client.list("v1", "pods", "n"))[0]:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                n1 = await client.get("v1", "nodes", None, "node-1")
                ready = next(c for c in n1["status"]["conditions"] if c["type"] == "Ready")
                assert ready["status"] == "Unknown" and ready["reason"] == "NodeStatusUnknown"
                assert {t["key"] for t in n1["spec"]["taints"]} == {"node.kubernetes.io/unreachable"}
                await client.create("v1", "pods", "n", python_pod("c", "pass"))
                pod = await wait_pod(client, "n", "c", lambda p: cond(p, "PodScheduled") is not None)
                assert "untolerated taint {node.kubernetes.io/unreachable: }" in cond(pod, "PodScheduled")["message"]
                node.recover()
                await wait_pod(client, "n", "c", phase("Succeeded"))
        asyncio.run(main())
        assert node.fates.applied["NodeLost"] == 1


def test_liveness_kills_http_readiness_and_deadline(cluster):
    port = 8080  # the pod's own port space; the kubelet probes the pod IP

    async def body(client, ns):
        await client.create("v1", "pods", ns, python_pod(
            "live", "import time; time.sleep(60)", restartPolicy="OnFailure", terminationGracePeriodSeconds=1,
            container={"livenessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 0.2, "failureThreshold": 2}}))
        await client.create("v1", "pods", ns, python_pod(
            "web", f"import http.server as h; h.HTTPServer(('0.0.0.0', {port}), h.SimpleHTTPRequestHandler).serve_forever()",
            terminationGracePeriodSeconds=1,
            container={"ports": [{"name": "http", "containerPort": port}],
                       "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 0.2},
                       "livenessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 0.2}}))
        await client.create("v1", "pods", ns, python_pod("late", "import time; time.sleep(60)",
                                                         activeDeadlineSeconds=1, terminationGracePeriodSeconds=1))
        live = await wait_pod(client, ns, "live", lambda p: (p["status"].get("containerStatuses") or [{}])[0].get("restartCount", 0) >= 1)
        last = live["status"]["containerStatuses"][0]["lastState"]["terminated"]
        assert (last["exitCode"], last["reason"]) == (143, "Error")  # SIGTERM'd by the kubelet
        web = await wait_pod(client, ns, "web", lambda p: (cond(p, "Ready") or {}).get("status") == "True")
        assert web["status"]["containerStatuses"][0]["restartCount"] == 0
        late = await wait_pod(client, ns, "late", phase("Failed"))
        assert late["status"]["reason"] == "DeadlineExceeded"
        for name in ("live", "web"):
            await client.delete("v1", "pods", ns, name)
    run(cluster, body)


# ---- the pod network -------------------------------------------------------------------------------------------

BIND = r"""
import os, socket, time
s = socket.socket()
s.bind(("0.0.0.0", 29500))  # the port every single-pod BranchSFT's torch.distributed takes
s.listen()
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect((os.environ["KUBERNETES_SERVICE_HOST"], 9))  # no packet sent: just picks the source address
print("bound", probe.getsockname()[0], sorted(os.listdir("/sys/class/net")), flush=True)
time.sleep(1.0)  # both hold the port at once
"""


def test_every_pod_has_its_own_network_namespace(cluster):
    _, node, _ = cluster

    async def body(client, ns):
        for name in ("a", "b"):
            await client.create("v1", "pods", ns, python_pod(name, BIND))
        for name in ("a", "b"):
            done = await wait_pod(client, ns, name, phase("Succeeded", "Failed"))
            text = node.logs(ns, name)
            assert done["status"]["phase"] == "Succeeded", text
            ip = done["status"]["podIP"]
            assert text.strip() == f"bound {ip} ['eth0', 'lo']"  # its own IP, its own interfaces
            assert done["status"]["hostIP"] == node.network.gateway
        a, b = [(await client.get("v1", "pods", ns, n))["status"]["podIP"] for n in ("a", "b")]
        assert a != b
    run(cluster, body)


PEER_B = r"""
import socket, sys, time
tries = 0
while True:  # pod a does not exist yet: its name appears in this running pod's /etc/hosts later
    t0 = time.monotonic()
    try:
        ip = socket.getaddrinfo("a-0.peers", 29500, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        break
    except socket.gaierror:
        tries += 1
        if tries == 1:  # fails fast: resolv.conf names no server that could time out
            print("not resolvable yet", round(time.monotonic() - t0, 3), flush=True)
        time.sleep(0.05)
for _ in range(200):
    try:
        conn = socket.create_connection((ip, 29500), timeout=5)
        break
    except ConnectionRefusedError:  # resolvable before it listens
        time.sleep(0.05)
print("resolved", ip, "after", tries, "tries; got", conn.recv(100).decode(), flush=True)
"""
PEER_A = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 29500))
s.listen()
conn, (peer, _) = s.accept()
conn.sendall(socket.gethostname().encode())
print("peer", peer, "me", socket.gethostbyname("a-0.peers"), socket.gethostbyname(socket.gethostname()), flush=True)
"""


def test_a_pod_reaches_a_peer_by_hostname_and_subdomain_started_later(cluster):
    _, node, _ = cluster

    async def body(client, ns):
        await client.create("v1", "services", ns, {"metadata": {"name": "peers"}, "spec": {
            "clusterIP": "None", "selector": {"app": "peers"}, "publishNotReadyAddresses": True,
            "ports": [{"port": 29500}]}})
        await client.create("v1", "pods", ns, python_pod("b", PEER_B, hostname="b-1", subdomain="peers",
                                                         labels={"app": "peers"}))
        await wait_pod(client, ns, "b", phase("Running"))
        deadline = time.monotonic() + 20
        while "not resolvable yet" not in node.logs(ns, "b"):
            assert time.monotonic() < deadline, node.logs(ns, "b")
            await asyncio.sleep(0.05)
        assert float(node.logs(ns, "b").split()[3]) < 1.0
        await client.create("v1", "pods", ns, python_pod("a", PEER_A, hostname="a-0", subdomain="peers",
                                                         labels={"app": "peers"}))
        pods = {}
        for name in ("a", "b"):
            pods[name] = await wait_pod(client, ns, name, phase("Succeeded", "Failed"))
            assert pods[name]["status"]["phase"] == "Succeeded", node.logs(ns, name)
        a_ip, b_ip = pods["a"]["status"]["podIP"], pods["b"]["status"]["podIP"]
        words = node.logs(ns, "b").split()
        assert words[words.index("resolved") + 1] == a_ip and words[-1] == "a-0" and int(words[-4]) >= 1
        assert node.logs(ns, "a").split() == ["peer", b_ip, "me", a_ip, a_ip]  # pod to pod, by pod IP
    run(cluster, body)


def test_a_pod_reaches_the_api_server_through_the_kubernetes_service(cluster):
    server, node, _ = cluster
    code = ("import json, os, urllib.request\n"
            "host, port = os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT']\n"
            "v = json.load(urllib.request.urlopen(f'http://{host}:{port}/version', timeout=10))\n"
            "print(host, port, v['gitVersion'])")

    async def body(client, ns):
        await client.create("v1", "pods", ns, python_pod("p", code))
        done = await wait_pod(client, ns, "p", phase("Succeeded", "Failed"))
        assert done["status"]["phase"] == "Succeeded", node.logs(ns, "p")
        port = server.url.rsplit(":", 1)[1]
        assert node.logs(ns, "p").split() == [node.network.gateway, port, "v1.33.0-testcluster"]
    run(cluster, body)


def test_stopping_the_node_leaves_no_network_behind(tmp_path):
    with ApiServer() as server:
        node = Node(server.url, tmp_path, retry_seconds=0.2).start()
        net = node.network
        try:
            async def main():
                async with Client(server.url) as client:
                    await client.create("v1", "namespaces", None, {"metadata": {"name": "n"}})
                    for name in ("a", "b"):
                        await client.create("v1", "pods", "n", python_pod(name, "import time; time.sleep(60)"))
                    for name in ("a", "b"):
                        await wait_pod(client, "n", name, phase("Running"))
                    await client.create("v1", "pods", "n", python_pod("c", "pass"))
                    await wait_pod(client, "n", "c", phase("Succeeded"))
            asyncio.run(main())
            deadline = time.monotonic() + 10
            while len(net.leftovers()) != 5:  # the finished pod's sandbox is gone: bridge + 2 x (veth, netns)
                assert time.monotonic() < deadline, net.leftovers()
                time.sleep(0.05)
        finally:
            node.stop()
        assert net.leftovers() == [] and net.closed
        assert not (Path("/run/testcluster-podnet") / f"{net.id}.lock").exists()
