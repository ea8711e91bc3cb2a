"""Deletion in the API-server stand-in: finalizers, propagation policies (Background, Foreground, Orphan and
batch/v1's orphaning default), the asynchronous garbage collector, graceful pod deletion, namespaces,
delete-collection, and the pod subresources (binding, log)."""
from __future__ import annotations

import time

import pytest

from testcluster import ApiError, ApiServer
from testcluster.wait import wait_for

from .apiserver_helpers import call, configmap, raw


@pytest.fixture(scope="module")
def server():
    with ApiServer(gc="background", gc_delay=0.2, gc_interval=0.5) as srv:
        yield srv


def owned(name: str, owner: dict, block: bool = False, **meta) -> dict:
    ref = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
           "uid": owner["metadata"]["uid"]}
    if block:
        ref["blockOwnerDeletion"] = True
    return configmap(name, ownerReferences=[ref], **meta)


def exists(server, name, gv="v1", plural="configmaps", ns="default") -> bool:
    return call(server.url, "get", gv, plural, ns, name) is not None


def pod(name: str, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "main", "image": "img:1"}], **spec}}


# ---- finalizers ------------------------------------------------------------------------------------------------

def test_finalizers_hold_a_deleted_object_until_removed(server):
    call(server.url, "create", "v1", "configmaps", "default", configmap("fin", finalizers=["example.com/hold"]))
    answer = call(server.url, "delete", "v1", "configmaps", "default", "fin")
    assert answer["metadata"]["deletionTimestamp"] and answer["metadata"]["deletionGracePeriodSeconds"] == 0
    assert exists(server, "fin")
    with pytest.raises(ApiError) as err:
        call(server.url, "patch", "v1", "configmaps", "default", "fin",
             {"metadata": {"finalizers": ["example.com/hold", "example.com/more"]}})
    assert err.value.status == 422 and "no new finalizers" in err.value.message
    still = call(server.url, "patch", "v1", "configmaps", "default", "fin", {"data": {"k": "changed"}})
    assert still["data"] == {"k": "changed"}  # other updates are allowed while deleting
    call(server.url, "patch", "v1", "configmaps", "default", "fin", {"metadata": {"finalizers": None}})
    assert not exists(server, "fin")


def test_immediate_delete_answers_a_status_except_for_pods(server):
    call(server.url, "create", "v1", "configmaps", "default", configmap("gone"))
    answer = call(server.url, "delete", "v1", "configmaps", "default", "gone")
    assert answer["kind"] == "Status" and answer["status"] == "Success"
    assert answer["details"]["name"] == "gone" and answer["details"]["kind"] == "configmaps"
    call(server.url, "create", "v1", "pods", "default", pod("unbound"))
    answer = call(server.url, "delete", "v1", "pods", "default", "unbound")
    assert answer["kind"] == "Pod"  # pods return the deleted object
    assert call(server.url, "delete", "v1", "configmaps", "default", "gone") is None  # 404
    created = call(server.url, "create", "v1", "configmaps", "default", configmap("pre"))
    with pytest.raises(ApiError) as err:
        call(server.url, "delete", "v1", "configmaps", "default", "pre", preconditions={"uid": "nope"})
    assert err.value.status == 409
    call(server.url, "delete", "v1", "configmaps", "default", "pre",
         preconditions={"uid": created["metadata"]["uid"]})


# ---- garbage collection ----------------------------------------------------------------------------------------

def test_gc_is_asynchronous(server):
    owner = call(server.url, "create", "v1", "configmaps", "default", configmap("owner"))
    child = call(server.url, "create", "v1", "configmaps", "default", owned("child", owner))
    call(server.url, "create", "v1", "configmaps", "default", owned("grandchild", child))
    call(server.url, "delete", "v1", "configmaps", "default", "owner")
    assert exists(server, "child")  # right after the DELETE returns: still there
    wait_for(lambda: not exists(server, "child"), timeout=5)
    wait_for(lambda: not exists(server, "grandchild"), timeout=5)  # the cascade, a level per pass


def test_gc_off_collects_nothing():
    with ApiServer(gc="off") as srv:
        owner = call(srv.url, "create", "v1", "configmaps", "default", configmap("owner"))
        call(srv.url, "create", "v1", "configmaps", "default", owned("child", owner))
        call(srv.url, "delete", "v1", "configmaps", "default", "owner")
        time.sleep(1.0)
        assert exists(srv, "child")
        # Foreground deletion stays pending without a collector, as in envtest.
        fg = call(srv.url, "create", "v1", "configmaps", "default", configmap("fg"))
        call(srv.url, "create", "v1", "configmaps", "default", owned("fg-child", fg, block=True))
        call(srv.url, "delete", "v1", "configmaps", "default", "fg", propagation="Foreground")
        time.sleep(0.5)
        left = call(srv.url, "get", "v1", "configmaps", "default", "fg")
        assert left["metadata"]["finalizers"] == ["foregroundDeletion"]


def test_gc_collects_dependents_of_owners_that_never_existed_or_were_recreated(server):
    ghost = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ghost", "uid": "0000-never"}}
    call(server.url, "create", "v1", "configmaps", "default", owned("orphaned", ghost))
    first = call(server.url, "create", "v1", "configmaps", "default", configmap("phoenix"))
    call(server.url, "create", "v1", "configmaps", "default", owned("of-first", first))
    call(server.url, "delete", "v1", "configmaps", "default", "phoenix")
    call(server.url, "create", "v1", "configmaps", "default", configmap("phoenix"))  # same name, new uid
    wait_for(lambda: not exists(server, "orphaned") and not exists(server, "of-first"), timeout=5)
    assert exists(server, "phoenix")


def test_gc_removes_only_the_dangling_reference_when_another_owner_lives(server):
    live = call(server.url, "create", "v1", "configmaps", "default", configmap("live-owner"))
    dead = call(server.url, "create", "v1", "configmaps", "default", configmap("dead-owner"))
    two = owned("two-owners", live)
    two["metadata"]["ownerReferences"].append(owned("x", dead)["metadata"]["ownerReferences"][0])
    call(server.url, "create", "v1", "configmaps", "default", two)
    call(server.url, "delete", "v1", "configmaps", "default", "dead-owner")
    wait_for(lambda: len(call(server.url, "get", "v1", "configmaps", "default", "two-owners")["metadata"][
        "ownerReferences"]) == 1, timeout=5)
    refs = call(server.url, "get", "v1", "configmaps", "default", "two-owners")["metadata"]["ownerReferences"]
    assert refs[0]["uid"] == live["metadata"]["uid"]


def test_foreground_deletion_waits_for_blocking_dependents(server):
    owner = call(server.url, "create", "v1", "configmaps", "default", configmap("fg-owner"))
    call(server.url, "create", "v1", "configmaps", "default",
         owned("fg-dep", owner, block=True, finalizers=["example.com/slow"]))
    answer = call(server.url, "delete", "v1", "configmaps", "default", "fg-owner", propagation="Foreground")
    assert answer["metadata"]["finalizers"] == ["foregroundDeletion"] and answer["metadata"]["deletionTimestamp"]
    dep = wait_for(lambda: (lambda d: d if d["metadata"].get("deletionTimestamp") else None)(
        call(server.url, "get", "v1", "configmaps", "default", "fg-dep")), timeout=5)
    assert dep["metadata"]["finalizers"] == ["example.com/slow"]
    time.sleep(0.6)
    assert exists(server, "fg-owner")  # blocked by the dependent that is still there
    call(server.url, "patch", "v1", "configmaps", "default", "fg-dep", {"metadata": {"finalizers": None}})
    wait_for(lambda: not exists(server, "fg-owner"), timeout=5)


def test_orphan_deletion_keeps_dependents_without_the_reference(server):
    owner = call(server.url, "create", "v1", "configmaps", "default", configmap("or-owner"))
    call(server.url, "create", "v1", "configmaps", "default", owned("or-dep", owner))
    answer = call(server.url, "delete", "v1", "configmaps", "default", "or-owner", propagation="Orphan")
    assert answer["metadata"]["finalizers"] == ["orphan"]
    wait_for(lambda: not exists(server, "or-owner"), timeout=5)
    dep = call(server.url, "get", "v1", "configmaps", "default", "or-dep")
    assert "ownerReferences" not in dep["metadata"]
    time.sleep(0.6)
    assert exists(server, "or-dep")


def _job_with_pod(server, name: str) -> dict:
    job = call(server.url, "create", "batch/v1", "jobs", "default", {
        "metadata": {"name": name},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i:1"}]}}}})
    ref = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"],
           "controller": True, "blockOwnerDeletion": True}
    call(server.url, "create", "v1", "pods", "default",
         {"metadata": {"name": f"{name}-pod", "ownerReferences": [ref]},
          "spec": {"containers": [{"name": "c", "image": "i:1"}], "restartPolicy": "Never"}})
    return job


def test_batch_v1_jobs_orphan_their_pods_by_default(server):
    _job_with_pod(server, "orphaning")
    answer = call(server.url, "delete", "batch/v1", "jobs", "default", "orphaning")  # no propagationPolicy
    assert answer["metadata"]["finalizers"] == ["orphan"]
    wait_for(lambda: not exists(server, "orphaning", "batch/v1", "jobs"), timeout=5)
    assert "ownerReferences" not in call(server.url, "get", "v1", "pods", "default", "orphaning-pod")["metadata"]
    _job_with_pod(server, "background")
    call(server.url, "delete", "batch/v1", "jobs", "default", "background", propagation="Background")
    assert not exists(server, "background", "batch/v1", "jobs")
    wait_for(lambda: not exists(server, "background-pod", "v1", "pods"), timeout=5)


# ---- pods --------------------------------------------------------------------------------------------------------

def test_binding_and_graceful_pod_deletion(server):
    call(server.url, "create", "v1", "pods", "default", pod("graceful", terminationGracePeriodSeconds=20))
    bound = call(server.url, "bind", "default", "graceful", "node-1")
    assert bound["status"] == "Success"
    p = call(server.url, "get", "v1", "pods", "default", "graceful")
    assert p["spec"]["nodeName"] == "node-1"
    assert {"type": "PodScheduled", "status": "True"}.items() <= p["status"]["conditions"][0].items()
    with pytest.raises(ApiError) as err:
        call(server.url, "bind", "default", "graceful", "node-2")
    assert err.value.status == 409
    answer = call(server.url, "delete", "v1", "pods", "default", "graceful")
    assert answer["metadata"]["deletionGracePeriodSeconds"] == 20 and answer["metadata"]["deletionTimestamp"]
    time.sleep(0.5)
    assert exists(server, "graceful", "v1", "pods")  # until the kubelet confirms
    shorter = call(server.url, "delete", "v1", "pods", "default", "graceful", grace_seconds=5)
    assert shorter["metadata"]["deletionGracePeriodSeconds"] == 5
    call(server.url, "delete", "v1", "pods", "default", "graceful", grace_seconds=0)
    assert not exists(server, "graceful", "v1", "pods")


def test_terminal_or_unbound_pods_go_at_once(server):
    call(server.url, "create", "v1", "pods", "default", pod("done", nodeName="node-1"))
    call(server.url, "patch", "v1", "pods", "default", "done", {"status": {"phase": "Succeeded"}}, sub="status")
    call(server.url, "delete", "v1", "pods", "default", "done")
    assert not exists(server, "done", "v1", "pods")
    assert call(server.url, "patch", "v1", "pods", "default", "unknown", {"spec": {}}) is None  # 404
    call(server.url, "create", "v1", "pods", "default", pod("immutable"))
    with pytest.raises(ApiError) as err:
        call(server.url, "patch", "v1", "pods", "default", "immutable", {"spec": {"restartPolicy": "Never"}})
    assert err.value.status == 422 and "pod updates may not change fields" in err.value.message
    image = call(server.url, "patch", "v1", "pods", "default", "immutable",
                 [{"op": "replace", "path": "/spec/containers/0/image", "value": "img:2"}], patch_type="json")
    assert image["spec"]["containers"][0]["image"] == "img:2"


def test_pod_logs_come_from_the_registered_file(server, tmp_path):
    call(server.url, "create", "v1", "pods", "default", pod("logger", nodeName="node-1"))
    status, body, _ = raw(server.url, "GET", "/api/v1/namespaces/default/pods/logger/log")
    assert status == 400 and "waiting to start" in body["message"]
    log_file = tmp_path / "main.log"
    log_file.write_text("one\ntwo\nthree\n")
    call(server.url, "register_log", "default", "logger", "main", str(log_file))
    assert call(server.url, "read_log", "default", "logger") == "one\ntwo\nthree\n"
    assert call(server.url, "read_log", "default", "logger", "main", tail_lines=1) == "three\n"
    status, body, _ = raw(server.url, "GET", "/api/v1/namespaces/default/pods/logger/log?container=nope")
    assert status == 400 and "not valid" in body["message"]


# ---- namespaces / collections ------------------------------------------------------------------------------------

def test_namespace_deletion_terminates_then_removes_content(server):
    call(server.url, "create", "v1", "namespaces", None, {"metadata": {"name": "doomed"}})
    ns = call(server.url, "get", "v1", "namespaces", None, "doomed")
    assert ns["status"]["phase"] == "Active" and ns["spec"]["finalizers"] == ["kubernetes"]
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "doomed"}
    call(server.url, "create", "v1", "configmaps", "doomed", configmap("inside"))
    answer = call(server.url, "delete", "v1", "namespaces", None, "doomed")
    assert answer["status"]["phase"] == "Terminating"
    with pytest.raises(ApiError) as err:
        call(server.url, "create", "v1", "configmaps", "doomed", configmap("late"))
    assert err.value.status == 403
    wait_for(lambda: not exists(server, "doomed", "v1", "namespaces", None), timeout=5)
    assert not exists(server, "inside", ns="doomed")


def test_delete_collection_with_a_label_selector(server):
    for i in range(3):
        call(server.url, "create", "v1", "configmaps", "default", configmap(f"batch-{i}", labels={"batch": "yes"}))
    call(server.url, "create", "v1", "configmaps", "default", configmap("keeper", labels={"batch": "no"}))
    call(server.url, "delete_collection", "v1", "configmaps", "default", label_selector="batch=yes")
    names = {o["metadata"]["name"] for o in call(server.url, "list", "v1", "configmaps", "default",
                                                  label_selector="batch")[0]}
    assert names == {"keeper"}
