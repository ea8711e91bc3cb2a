"""plan() and the cache over a CR's life (plain dicts): a finished run stays finished when the spec reads
differently without a new generation (CRD defaults), reruns by annotation run once per value, children of a
deleted namesake (another uid) are never adopted, and what a resync after a watch gap drops.
The same cases end to end on the stand-in cluster: tests/cluster/test_operator_lifecycle.py."""
from __future__ import annotations

import copy

from branchmerge.api.conditions import get_condition
from branchmerge.api.labels import ANNOTATION_RERUN
from branchmerge.operator.naming import owned_by
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import (WAITING_FOR_CLEANUP, Observed, finished_for_good, plan, run_hash, target,
                                       wait_for_cleanup)
from branchmerge.operator.watch_cache import WatchCache

from .kube_objects import MERGE_SPEC, cr, finish_job, pod, result_message

OPTS = OperatorOptions()
T0 = 1_767_225_600.0


def step(doc, observed=None, now=T0):
    p = plan(doc, {}, observed or Observed(), OPTS, now)
    doc["status"] = p.status
    return p


def succeed(doc) -> dict:
    """Run ``doc`` to Succeeded; returns its finished Job."""
    job = step(doc).create[-1]
    done = finish_job(job, True)
    name = job["metadata"]["name"]
    p = step(doc, Observed(jobs=[done], pods={name: [pod(name, message=result_message("pvc://models/merged"))]}))
    assert p.status["phase"] == "Succeeded"
    return done


def test_a_finished_run_stays_finished_when_the_spec_reads_differently_at_the_same_generation():
    doc = cr("Merge", "m", MERGE_SPEC)
    job = succeed(doc)
    before = target(doc, {}, OPTS).run_hash
    # what a CRD upgrade adding a default does: the spec as read gains a field, the generation stays
    doc["spec"]["parameters"] = {"normalize": True}
    assert target(doc, {}, OPTS).run_hash != before and finished_for_good(doc)
    p = step(doc, Observed(jobs=[job]))
    assert not p.create and not p.delete and not p.patch and not p.events and p.status["phase"] == "Succeeded"
    # an edit by the user (a new generation) is a new run
    doc["metadata"]["generation"] = 2
    p = step(doc, Observed(jobs=[job]))
    assert [c["kind"] for c in p.create] == ["ConfigMap", "Job"] and p.status["phase"] == "Running"


def test_a_failed_run_stays_failed_but_a_spec_rejected_before_any_job_is_looked_at_again():
    doc = cr("Merge", "m", MERGE_SPEC)
    job = step(doc).create[-1]
    name = job["metadata"]["name"]
    step(doc, Observed(jobs=[finish_job(job, False)], pods={name: [pod(name, exit_code=2)]}))
    assert doc["status"]["phase"] == "Failed" and finished_for_good(doc)
    rejected = cr("Merge", "bad", {"method": "nope", "models": []})
    step(rejected)
    assert rejected["status"]["phase"] == "Failed" and not finished_for_good(rejected)


def test_a_rerun_annotation_runs_once_per_new_value():
    doc = cr("Merge", "m", MERGE_SPEC)
    first = succeed(doc)
    plain = target(doc, {}, OPTS).run_hash
    doc["metadata"]["annotations"] = {ANNOTATION_RERUN: "2026-12-06"}
    assert not finished_for_good(doc)
    p = step(doc, Observed(jobs=[first]))
    rerun = p.create[-1]
    assert rerun["metadata"]["name"] != first["metadata"]["name"] and rerun["metadata"]["name"].endswith("-1")
    assert p.status["phase"] == "Running" and p.status["attempts"] == 1 and "output" not in p.status
    assert get_condition(p.status, "Rerun")["message"] == "2026-12-06"
    assert target(doc, {}, OPTS).run_hash not in (plain, first["metadata"]["labels"]["branchmerge.dev/run"])
    # the value is consumed: the run goes on, then finishes for good
    p = step(doc, Observed(jobs=[first, rerun]))
    assert not p.create and p.status["phase"] == "Running"
    name = rerun["metadata"]["name"]
    p = step(doc, Observed(jobs=[first, finish_job(rerun, True)],
                           pods={name: [pod(name, message=result_message("pvc://models/merged"))]}))
    assert p.status["phase"] == "Succeeded" and finished_for_good(doc)
    # removing the annotation asks for nothing; a new value asks again
    del doc["metadata"]["annotations"][ANNOTATION_RERUN]
    assert finished_for_good(doc) and not step(doc).create
    doc["metadata"]["annotations"][ANNOTATION_RERUN] = "again"
    assert [c["kind"] for c in step(doc, Observed(jobs=[first])).create] == ["ConfigMap", "Job"]


def test_hashes_of_crs_without_a_rerun_are_unchanged():
    resolved = {"kind": "Merge", "spec": copy.deepcopy(MERGE_SPEC)}
    assert run_hash(resolved) == run_hash(resolved, None) != run_hash(resolved, "x") != run_hash(resolved, "y")


def test_children_of_a_deleted_namesake_are_not_adopted():
    old = cr("Merge", "m", MERGE_SPEC, uid="uid-old")
    old_job = succeed(old)
    record = {"metadata": {"annotations": {"branchmerge.dev/result": '{"phase": "Succeeded", "attempt": 1}'},
                           "ownerReferences": old_job["metadata"]["ownerReferences"]}}
    new = cr("Merge", "m", MERGE_SPEC, uid="uid-new")
    assert not owned_by(old_job, "uid-new") and owned_by(old_job, "uid-old")
    # same name, same spec: the old Job and its result record have this CR's names and labels
    p = step(new, Observed(jobs=[old_job], configmap=record))
    assert [c["kind"] for c in p.create] == ["ConfigMap", "Job"] and p.status["phase"] == "Running"
    assert p.create[-1]["metadata"]["name"] == old_job["metadata"]["name"]
    assert p.create[-1]["metadata"]["ownerReferences"][0]["uid"] == "uid-new"
    # its creation meets the old one (409): wait for the garbage collector, say why
    w = wait_for_cleanup(new, "Job", old_job["metadata"]["name"], "uid-old")
    ready = get_condition(w.status, "Ready")
    assert w.status["phase"] == "Waiting" and ready["reason"] == WAITING_FOR_CLEANUP and w.requeue_after
    assert "uid-old" in ready["message"] and "garbage collector" in ready["message"] and not w.create


def _job(name: str, uid: str, rv: int, owner_uid: str = "cr-1") -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": str(rv),
                         "labels": {"app.kubernetes.io/managed-by": "branchmerge-operator",
                                    "branchmerge.dev/kind": "Merge", "branchmerge.dev/name": "m"},
                         "ownerReferences": [{"kind": "Merge", "name": "m", "uid": owner_uid, "controller": True}]}}


def _merge(name: str, uid: str, rv: int) -> dict:
    return {"kind": "Merge", "metadata": {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": str(rv)},
            "spec": {}}


def test_store_resync_drops_what_a_later_list_lacks_and_keeps_what_came_after_it():
    cache = WatchCache()
    cache.put_job(_job("gone", "j1", 5))
    cache.put_job(_job("kept", "j2", 6))
    cache.put_job(_job("newer", "j3", 20))  # created after the list below
    cache.put_cr(_merge("up", "c1", 7))
    cache.put_cr(_merge("down", "c2", 8))
    listed_jobs = {"kept": _job("kept", "j2", 6)}
    assert [j["metadata"]["name"] for j in cache.stale_jobs("ns", listed_jobs, 10)] == ["gone"]
    down = _merge("down", "c2", 8)
    assert [c["metadata"]["name"] for c in cache.stale_crs("ns", "Merge", {"down": down}, 10)] == ["up"]
    # re-created under the same name during the gap: the stored one is another object
    recreated = {"up": _merge("up", "c9", 9), "down": down}
    assert [c["metadata"]["name"] for c in cache.stale_crs("ns", "Merge", recreated, 10)] == ["up"]
    assert cache.stale_jobs("ns", {}, None) == []  # no usable list version: drop nothing
    assert cache.namespaces() == {"ns"}


def test_store_keys_children_by_owner_uid():
    cache = WatchCache()
    key = cache.put_job(_job("m-abc-1", "old-job", 5, owner_uid="cr-old"))
    assert cache.jobs_of(key, "cr-new") == [] and len(cache.jobs_of(key, "cr-old")) == 1
    cache.put_job(_job("m-abc-1", "new-job", 9, owner_uid="cr-new"))  # same name, the new CR's
    # the old Job's DELETED event, late: must not remove the new Job of the same name
    assert cache.drop_job(_job("m-abc-1", "old-job", 10, owner_uid="cr-old")) is None
    assert [j["metadata"]["uid"] for j in cache.jobs_of(key, "cr-new")] == ["new-job"]
    cache.put_cr(_merge("m", "cr-new", 11))
    assert cache.drop_cr("ns", "Merge", "m", uid="cr-old") is False and ("ns", "Merge", "m") in cache.crs
    assert cache.drop_cr("ns", "Merge", "m", uid="cr-new") is True and ("ns", "Merge", "m") not in cache.crs
