"""Admission on pod CREATE in the API server stand-in (testcluster/admission.py), over real HTTP:
ServiceAccount, Priority and ResourceQuota, with kube-apiserver's status codes and messages."""
from __future__ import annotations

import itertools
import json

import pytest

from testcluster import ApiServer
from testcluster.admission import format_quantity, pod_usage
from testcluster.podspec import quantity
from testcluster.wait import wait_for

from .apiserver_helpers import call, raw

_ns = itertools.count()


@pytest.fixture(scope="module")
def server():
    with ApiServer(crds_dir=None) as srv:
        yield srv


@pytest.fixture
def ns(server):
    name = f"adm-{next(_ns)}"
    call(server.url, "create", "v1", "namespaces", None, {"metadata": {"name": name}})
    return name


def pod(name: str | None = None, *, resources: dict | None = None, generate: str | None = None, init=None, **spec):
    container = {"name": "main", "image": "busybox"}
    if resources is not None:
        container["resources"] = resources
    meta = {"name": name} if name else {"generateName": generate}
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [container], **spec}}
    if init:
        body["spec"]["initContainers"] = init
    return body


def post(server, ns, body):
    """(status, answer) of a pod POST."""
    status, answer, _ = raw(server.url, "POST", f"/api/v1/namespaces/{ns}/pods", json.dumps(body).encode())
    return status, answer


def refused(server, ns, body) -> str:
    status, answer = post(server, ns, body)
    assert status == 403, answer
    assert answer["kind"] == "Status" and answer["reason"] == "Forbidden" and answer["code"] == 403
    return answer["message"]


def quota(server, ns, name, hard):
    return call(server.url, "create", "v1", "resourcequotas", ns, {"metadata": {"name": name}, "spec": {"hard": hard}})


# ---- ServiceAccount ------------------------------------------------------------------------------------------------

def test_service_account_must_exist_except_default(server, ns):
    assert refused(server, ns, pod("a", serviceAccountName="runner")) == (
        f'pods "a" is forbidden: error looking up service account {ns}/runner: serviceaccount "runner" not found')
    # before name generation: the prefix names the pod, as the real admission.NewForbidden does
    assert refused(server, ns, pod(generate="job-", serviceAccountName="runner")).startswith('pods "job-" is forbidden')
    created = call(server.url, "create", "v1", "pods", ns, pod("b"))
    assert created["spec"]["serviceAccountName"] == created["spec"]["serviceAccount"] == "default"
    call(server.url, "create", "v1", "serviceaccounts", ns, {"metadata": {"name": "runner"}})
    created = call(server.url, "create", "v1", "pods", ns, pod("a", serviceAccountName="runner"))
    assert created["spec"]["serviceAccountName"] == "runner"


# ---- Priority ------------------------------------------------------------------------------------------------------

def test_priority_class_must_exist_and_sets_the_priority(server, ns):
    assert refused(server, ns, pod("p", priorityClassName="high")) == (
        'pods "p" is forbidden: no PriorityClass with name high was found')
    names = {pc["metadata"]["name"] for pc in call(server.url, "list", "scheduling.k8s.io/v1", "priorityclasses")[0]}
    assert {"system-cluster-critical", "system-node-critical"} <= names
    crit = call(server.url, "create", "v1", "pods", ns, pod("crit", priorityClassName="system-cluster-critical"))
    assert crit["spec"]["priority"] == 2000000000
    call(server.url, "create", "scheduling.k8s.io/v1", "priorityclasses", None,
         {"metadata": {"name": f"high-{ns}"}, "value": 1000, "preemptionPolicy": "Never"})
    made = call(server.url, "create", "v1", "pods", ns, pod("p", priorityClassName=f"high-{ns}"))
    assert made["spec"]["priority"] == 1000 and made["spec"]["preemptionPolicy"] == "Never"
    plain = call(server.url, "create", "v1", "pods", ns, pod("plain"))
    assert plain["spec"]["priority"] == 0 and "priorityClassName" not in plain["spec"]
    message = refused(server, ns, pod("own", priorityClassName=f"high-{ns}", priority=5))
    assert "the integer value of priority (5) must not be provided in pod spec" in message


def test_priority_class_rules(server):
    status, answer, _ = raw(server.url, "POST", "/apis/scheduling.k8s.io/v1/priorityclasses", json.dumps(
        {"metadata": {"name": "system-mine"}, "value": 1}).encode())
    assert status == 422 and "reserved" in answer["message"]
    status, answer, _ = raw(server.url, "POST", "/apis/scheduling.k8s.io/v1/priorityclasses", json.dumps(
        {"metadata": {"name": "too-high"}, "value": 2000000000}).encode())
    assert status == 422 and "maximum allowed value of a user defined priority is 1000000000" in answer["message"]
    status, answer, _ = raw(server.url, "DELETE", "/apis/scheduling.k8s.io/v1/priorityclasses/system-node-critical")
    assert status == 403 and "cannot be deleted" in answer["message"]
    call(server.url, "create", "scheduling.k8s.io/v1", "priorityclasses", None,
         {"metadata": {"name": "default-prio"}, "value": 7, "globalDefault": True})
    try:
        status, answer, _ = raw(server.url, "POST", "/apis/scheduling.k8s.io/v1/priorityclasses", json.dumps(
            {"metadata": {"name": "second-default"}, "value": 8, "globalDefault": True}).encode())
        assert status == 403 and "default-prio is already marked as default" in answer["message"]
        call(server.url, "create", "v1", "namespaces", None, {"metadata": {"name": "adm-gd"}})
        made = call(server.url, "create", "v1", "pods", "adm-gd", pod("x"))
        assert made["spec"]["priority"] == 7 and made["spec"]["priorityClassName"] == "default-prio"
    finally:
        call(server.url, "delete", "scheduling.k8s.io/v1", "priorityclasses", None, "default-prio")


# ---- ResourceQuota -------------------------------------------------------------------------------------------------

def test_quota_rejects_pods_over_the_limit(server, ns):
    quota(server, ns, "compute", {"pods": "2", "requests.cpu": "1", "requests.memory": "1Gi",
                                  "requests.nvidia.com/gpu": "1"})
    small = {"requests": {"cpu": "600m", "memory": "512Mi"}}
    call(server.url, "create", "v1", "pods", ns, pod("one", resources=small))
    message = refused(server, ns, pod("two", resources=small))
    assert message == ('pods "two" is forbidden: exceeded quota: compute, requested: requests.cpu=600m, used: '
                       'requests.cpu=600m, limited: requests.cpu=1')
    gpus = {"requests": {"cpu": "100m", "memory": "1Mi"}, "limits": {"nvidia.com/gpu": "2"}}
    assert refused(server, ns, pod("gpu", resources=gpus)) == (
        'pods "gpu" is forbidden: exceeded quota: compute, requested: requests.nvidia.com/gpu=2, used: '
        'requests.nvidia.com/gpu=0, limited: requests.nvidia.com/gpu=1')
    # the generated name appears: ResourceQuota runs after the name is generated
    message = refused(server, ns, pod(generate="gen-", resources=small))
    assert message.startswith('pods "gen-') and not message.startswith('pods "gen-" ')
    st = wait_for(lambda: (call(server.url, "get", "v1", "resourcequotas", ns, "compute").get("status") or {})
                  .get("used", {}).get("pods") == "1" and call(server.url, "get", "v1", "resourcequotas", ns,
                                                                "compute")["status"])
    assert st["hard"]["requests.cpu"] == "1"
    assert st["used"] == {"pods": "1", "requests.cpu": "600m", "requests.memory": "512Mi",
                          "requests.nvidia.com/gpu": "0"}
    # the pods count: a third small pod fits the cpu once the first is gone, then the pod count stops it
    call(server.url, "delete", "v1", "pods", ns, "one")
    wait_for(lambda: call(server.url, "get", "v1", "resourcequotas", ns, "compute")["status"]["used"]["pods"] == "0")
    tiny = {"requests": {"cpu": "100m", "memory": "1Mi"}}
    call(server.url, "create", "v1", "pods", ns, pod("a", resources=tiny))
    call(server.url, "create", "v1", "pods", ns, pod("b", resources=tiny))
    assert refused(server, ns, pod("c", resources=tiny)) == (
        'pods "c" is forbidden: exceeded quota: compute, requested: pods=1, used: pods=2, limited: pods=2')


def test_quota_on_compute_requires_it_to_be_set(server, ns):
    quota(server, ns, "limits", {"limits.cpu": "2", "memory": "2Gi"})
    assert refused(server, ns, pod("bare")) == (
        'pods "bare" is forbidden: failed quota: limits: must specify limits.cpu for: main; memory for: main')
    init = [{"name": "setup", "image": "busybox", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]
    assert refused(server, ns, pod("half", resources={"limits": {"cpu": "1"}}, init=init)) == (
        'pods "half" is forbidden: failed quota: limits: must specify memory for: main')
    # limits alone are enough: requests default to them
    call(server.url, "create", "v1", "pods", ns, pod("ok", resources={"limits": {"cpu": "1", "memory": "1Gi"}}))


def test_terminal_pods_and_raised_quotas_free_room(server, ns):
    quota(server, ns, "pods", {"pods": "1"})
    call(server.url, "create", "v1", "pods", ns, pod("first"))
    refused(server, ns, pod("second"))
    first = call(server.url, "get", "v1", "pods", ns, "first")
    call(server.url, "patch", "v1", "pods", ns, "first", {"status": {"phase": "Succeeded"}}, sub="status")
    assert first["metadata"]["name"] == "first"
    call(server.url, "create", "v1", "pods", ns, pod("second"))  # a finished pod no longer counts
    refused(server, ns, pod("third"))
    call(server.url, "patch", "v1", "resourcequotas", ns, "pods", {"spec": {"hard": {"pods": "3"}}})
    call(server.url, "create", "v1", "pods", ns, pod("third"))
    st = wait_for(lambda: (q := call(server.url, "get", "v1", "resourcequotas", ns, "pods"))["status"]["hard"]
                  == {"pods": "3"} and q["status"])
    assert st["used"] == {"pods": "2"}


def test_quota_validation(server, ns):
    status, answer, _ = raw(server.url, "POST", f"/api/v1/namespaces/{ns}/resourcequotas", json.dumps(
        {"metadata": {"name": "bad"}, "spec": {"hard": {"cpu": "lots"}}}).encode())
    assert status == 422 and "spec.hard[cpu]" in answer["message"]


def test_pod_usage_follows_kubernetes_pod_requests():
    spec = {"containers": [{"name": "a", "resources": {"requests": {"cpu": "1"}}},
                           {"name": "b", "resources": {"limits": {"cpu": "500m", "memory": "1Gi"}}}],
            "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "2", "memory": "256Mi"}}},
                               {"name": "side", "restartPolicy": "Always",
                                "resources": {"requests": {"cpu": "100m"}}}],
            "overhead": {"cpu": "10m"}}
    usage = pod_usage({"spec": spec})
    # containers 1.5 + sidecar 0.1 = 1.6 < the init container's 2 (no sidecar before it) -> 2, + overhead
    assert usage["requests.cpu"] == quantity("2010m") and usage["cpu"] == quantity("2010m")
    assert usage["requests.memory"] == quantity("1Gi") and usage["limits.cpu"] == quantity("510m")
    assert "limits.memory" in usage and "requests.nvidia.com/gpu" not in usage
    assert usage["pods"] == 1
    assert [format_quantity(quantity(q), r) for q, r in (("1500m", "cpu"), ("2000", "pods"), ("1Gi", "memory"),
                                                         ("500M", "memory"), ("0.5", "cpu"))] == \
        ["1500m", "2k", "1Gi", "500M", "500m"]


def test_object_counts_of_other_kinds_are_not_enforced(server, ns):
    quota(server, ns, "zero", {"pods": "0", "configmaps": "0"})
    call(server.url, "create", "v1", "configmaps", ns, {"metadata": {"name": "c"}, "data": {}})
    assert "exceeded quota: zero, requested: pods=1, used: pods=0, limited: pods=0" in refused(server, ns, pod("p"))
    st = wait_for(lambda: call(server.url, "get", "v1", "resourcequotas", ns, "zero")["status"].get("used"))
    assert st == {"pods": "0"}  # configmaps: not tracked (documented in testcluster/admission.py)
