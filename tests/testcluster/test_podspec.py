"""The kubelet's and the scheduler's pure decisions (no server, no processes)."""
from __future__ import annotations

import base64
from fractions import Fraction

import pytest

from testcluster.fates import Fates
from testcluster.podspec import (ConfigError, container_env, expand, hosts_file, pod_phase, quantity, run_as,
                                 termination_message)
from testcluster.scheduler import node_reasons, pod_requests, prefilter, tolerates, unschedulable_message

POD = {"metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "a"},
                    "annotations": {"batch.kubernetes.io/job-completion-index": "3"}},
       "spec": {"nodeName": "node-1", "serviceAccountName": "sa"}, "status": {"podIP": "127.0.0.1"}}
NODE = {"metadata": {"name": "node-1", "labels": {"kubernetes.io/hostname": "node-1", "pool": "cpu", "size": "4"}},
        "spec": {}, "status": {"allocatable": {"cpu": "2", "memory": "24Gi", "pods": "110"}}}


@pytest.mark.parametrize("text,want", [
    ("$(A)-x", "1-x"), ("$$(A)", "$(A)"), ("$(MISSING)", "$(MISSING)"), ("$$", "$"), ("a$b", "a$b"),
    ("$(A", "$(A"), ("$(A)$(B)", "12"), ("$", "$")])
def test_expand_follows_kubernetes(text, want):
    assert expand(text, {"A": "1", "B": "2"}) == want


@pytest.mark.parametrize("text,want", [("500m", Fraction(1, 2)), ("2", 2), ("24Gi", 24 * 2 ** 30),
                                       ("1e3", 1000), ("1.5", Fraction(3, 2)), ("128Mi", 128 * 2 ** 20), ("1k", 1000)])
def test_quantities(text, want):
    assert quantity(text) == want


def test_env_in_order_with_refs():
    objects = {("configmaps", "cm"): {"data": {"A": "from-cm", "bad key": "x"}},
               ("secrets", "s"): {"data": {"k": base64.b64encode(b"secret").decode()}}}
    lookup = lambda plural, name: objects.get((plural, name))  # noqa: E731
    container = {"envFrom": [{"configMapRef": {"name": "cm"}}, {"prefix": "S_", "secretRef": {"name": "s"}}],
                 "env": [{"name": "A", "value": "over-$(A)"},
                         {"name": "IDX", "valueFrom": {"fieldRef": {
                             "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                         {"name": "LBL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                         {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                         {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                         {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}},
                         {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]}
    env = container_env(POD, container, lookup, service_env={"KUBERNETES_SERVICE_HOST": "h"},
                        allocatable={"cpu": "2"})
    assert env == {"KUBERNETES_SERVICE_HOST": "h", "A": "over-from-cm", "S_k": "secret", "IDX": "3", "LBL": "a",
                   "IP": "127.0.0.1", "SA": "sa", "CPU": "2"}
    with pytest.raises(ConfigError, match='^configmap "missing" not found$'):
        container_env(POD, {"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "missing", "key": "k"}}}]},
                      lookup, service_env={})
    with pytest.raises(ConfigError, match="^couldn't find key z in ConfigMap ns/cm$"):
        container_env(POD, {"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "z"}}}]},
                      lookup, service_env={})


def test_users():
    pod = {**POD, "spec": {"securityContext": {"runAsUser": 1000, "fsGroup": 2000, "supplementalGroups": [5]}}}
    assert run_as(pod, {}, "65532:65532") == (1000, 0, [5, 2000])
    assert run_as(POD, {}, "65532:65532") == (65532, 65532, [])
    assert run_as(POD, {"securityContext": {"runAsUser": 7, "runAsGroup": 8}}, None) == (7, 8, [])
    nonroot = {**POD, "spec": {"securityContext": {"runAsNonRoot": True}}}
    assert run_as(nonroot, {}, "1000:1000") == (1000, 1000, [])
    with pytest.raises(ConfigError, match=r'^container has runAsNonRoot and image will run as root \(pod: "p_ns\(u1\)", '
                                          r'container: c\)$'):
        run_as(nonroot, {"name": "c"}, None)
    with pytest.raises(ConfigError, match="non-numeric user"):
        run_as(nonroot, {"name": "c"}, "app")


def test_termination_message_and_fallback():
    log = b"".join(f"line {i}\n".encode() for i in range(200))
    assert termination_message(b"ok", lambda: log, "FallbackToLogsOnError", 1) == "ok"
    fallback = termination_message(b"", lambda: log, "FallbackToLogsOnError", 1)
    assert fallback.splitlines()[-1] == "line 199" and len(fallback.splitlines()) == 80
    assert termination_message(b"", lambda: log, "FallbackToLogsOnError", 0) == ""
    assert termination_message(b"", lambda: log, "File", 1) == ""
    assert len(termination_message(b"y" * 10000, lambda: b"", "File", 0)) == 4096


def test_hosts_file_names_the_pod():
    pod = {"metadata": {"name": "job-0-abcde", "namespace": "ns"}, "spec": {"hostname": "job-0", "subdomain": "svc"}}
    text = hosts_file(pod, "127.0.0.1")
    assert text.startswith("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n")
    assert "127.0.0.1\tjob-0.svc.ns.svc.cluster.local\tjob-0\n" in text


def test_pod_phase():
    run, term0, term1 = ({"state": {"running": {}}}, {"state": {"terminated": {"exitCode": 0}}},
                         {"state": {"terminated": {"exitCode": 1}}})
    restarting = {"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": {"exitCode": 1}}}
    assert pod_phase("Never", [], [run, term0], False) == "Running"
    assert pod_phase("Never", [], [term0, term1], False) == "Failed"
    assert pod_phase("OnFailure", [], [restarting], False) == "Running"
    assert pod_phase("Never", [], [term0], False) == "Succeeded"
    assert pod_phase("Never", [run], [{"state": {"waiting": {}}}], False) == "Pending"
    assert pod_phase("Never", [term1], [{"state": {"waiting": {}}}], True) == "Failed"


# ---- scheduler ----------------------------------------------------------------------------------------------------

def pod(**spec):
    return {"metadata": {"name": "p", "namespace": "ns"}, "spec": {"containers": [{"name": "c"}], **spec}}


def test_requests_sum_containers_and_max_init():
    p = pod(containers=[{"resources": {"requests": {"cpu": "500m"}}}, {"resources": {"limits": {"cpu": "1",
                                                                                                "memory": "1Gi"}}}],
            initContainers=[{"resources": {"requests": {"cpu": "2"}}}])
    assert pod_requests(p) == {"cpu": 2, "memory": 2 ** 30}


def test_taints_and_tolerations():
    taint = {"key": "gpu", "value": "a100", "effect": "NoSchedule"}
    assert tolerates({"key": "gpu", "operator": "Exists"}, taint)
    assert tolerates({"key": "gpu", "value": "a100", "effect": "NoSchedule"}, taint)
    assert not tolerates({"key": "gpu", "value": "h100"}, taint)
    assert tolerates({"operator": "Exists"}, taint)
    assert not tolerates({"key": "gpu", "operator": "Exists", "effect": "NoExecute"}, taint)
    node = {**NODE, "spec": {"taints": [taint]}}
    assert node_reasons(pod(), node, [])[0] == ["node(s) had untolerated taint {gpu: a100}"]
    assert node_reasons(pod(tolerations=[{"key": "gpu", "operator": "Exists"}]), node, []) == ([], "resources")


def test_affinity_and_resources():
    term = lambda *exprs: {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {  # noqa: E731
        "nodeSelectorTerms": [{"matchExpressions": list(exprs)}]}}}
    assert node_reasons(pod(affinity=term({"key": "pool", "operator": "In", "values": ["cpu"]})), NODE, [])[0] == []
    assert node_reasons(pod(affinity=term({"key": "size", "operator": "Gt", "values": ["8"]})), NODE, [])[0] == \
        ["node(s) didn't match Pod's node affinity/selector"]
    assert node_reasons(pod(affinity=term({"key": "gpu", "operator": "DoesNotExist"})), NODE, [])[0] == []
    big = pod(containers=[{"resources": {"requests": {"cpu": "1500m", "memory": "30Gi"}}}])
    running = pod(containers=[{"resources": {"requests": {"cpu": "1"}}}])
    reasons, _ = node_reasons(big, NODE, [running])
    assert reasons == ["Insufficient cpu", "Insufficient memory"]
    assert unschedulable_message(1, [(reasons, "resources")]) == (
        "0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient memory. preemption: 0/1 nodes are available: "
        "1 No preemption victims found for incoming pod.")
    assert prefilter(pod(volumes=[{"persistentVolumeClaim": {"claimName": "c"}}]), set(), None) == \
        'persistentvolumeclaim "c" not found'
    assert prefilter(pod(priorityClassName="high"), set(), {"low"}) == "no PriorityClass with name high was found"
    assert prefilter(pod(priorityClassName="high"), set(), None) is None  # not served: not checked


def test_fates_are_counted_and_decided_once():
    fates = Fates()
    fates.add("app=a", "OOMKilled", count=1)
    first = {"metadata": {"uid": "1", "labels": {"app": "a"}}}
    second = {"metadata": {"uid": "2", "labels": {"app": "a"}}}
    from testcluster.fates import KUBELET
    assert fates.decide(first, KUBELET).name == "OOMKilled"
    assert fates.decide(first, KUBELET).name == "OOMKilled"  # same pod: same decision
    assert fates.decide(second, KUBELET) is None  # count used up
    with pytest.raises(ValueError):
        fates.add("app=a", "Exploded")
