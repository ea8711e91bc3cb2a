"""plan(): dependencies, children, status transitions, retries, suspend, spec changes (plain dicts)."""
from __future__ import annotations

import json

from branchmerge.api.conditions import get_condition
from branchmerge.api.labels import ANNOTATION_RESULT
from branchmerge.operator.failures import classify_failure, stage_result
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import Observed, plan, status_changed, target, transition_events, upstream_view

from .kube_objects import MERGE_SPEC, cr, finish_job, pipeline, pod, result_message

OPTS = OperatorOptions()
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def step(doc, observed=None, upstreams=None, now=T0):
    """One reconcile: plan, then apply the status as the API server would."""
    p = plan(doc, upstreams or {}, observed or Observed(), OPTS, now)
    doc["status"] = p.status
    return p


def ready(status):
    return get_condition(status, "Ready")


def test_dependencies_wait_then_start():
    gen, sft, merge, ev = pipeline()
    p = step(sft, upstreams=upstream_view([gen]))
    assert p.status["phase"] == "Waiting" and ready(p.status)["reason"] == "UpstreamNotReady"
    assert "TeacherGen/gen" in ready(p.status)["message"] and not p.create
    assert [e.reason for e in p.events] == ["UpstreamNotReady"]
    assert step(sft, upstreams=upstream_view([gen])).events == []  # no change, no new Event

    p = step(ev, upstreams={})
    assert p.status["phase"] == "Waiting" and ready(p.status)["reason"] == "UpstreamNotFound"

    gen["status"] = {"phase": "Failed"}
    p = step(sft, upstreams=upstream_view([gen]))
    assert ready(p.status)["reason"] == "UpstreamFailed"
    assert get_condition(p.status, "Stalled")["status"] == "True" and p.events[0].type == "Warning"

    gen["status"] = {"phase": "Succeeded", "output": {"uri": "pvc://data/traces-out"}}
    p = step(sft, upstreams=upstream_view([gen]))
    assert [c["kind"] for c in p.create] == ["ConfigMap", "Job"] and p.status["phase"] == "Running"
    assert p.run.spec["data"][0]["uri"] == "pvc://data/traces-out"  # from: resolved to the upstream's output
    assert p.status["attempts"] == 1 and p.status["observedGeneration"] == 1 and p.status["startTime"]
    assert get_condition(p.status, "Stalled")["status"] == "False"


def test_success_reads_termination_message_and_records_result():
    doc = cr("Merge", "m", MERGE_SPEC)
    job = step(doc).create[-1]
    p = step(doc, Observed(jobs=[job]))
    assert p.status["phase"] == "Running" and ready(p.status)["reason"] == "Started" and not p.events
    job["status"] = {"active": 1}  # a pod exists (active counts pending pods too): still starting
    assert ready(step(doc, Observed(jobs=[job])).status)["reason"] == "Started"
    job["status"] = {"active": 1, "ready": 1}
    assert ready(step(doc, Observed(jobs=[job])).status)["reason"] == "Running"
    done = finish_job(job, True)
    pods = {job["metadata"]["name"]: [pod(job["metadata"]["name"], message=result_message("pvc://models/merged",
                                                                                         tensorsMerged=5))]}
    p = step(doc, Observed(jobs=[done], pods=pods))
    assert p.status["phase"] == "Succeeded" and p.finished == "Succeeded"
    assert p.status["output"] == {"uri": "pvc://models/merged", "digest": "sha256:abc"}
    assert p.status["metrics"]["tensorsMerged"] == 5 and p.status["progress"]["fraction"] == 1.0
    assert p.status["completionTime"] == "2026-01-01T00:00:00Z"
    assert get_condition(p.status, "Ready")["status"] == "True" and [e.reason for e in p.events] == ["Succeeded"]
    kind, name, patch = p.patch[0]
    assert kind == "ConfigMap" and json.loads(patch["metadata"]["annotations"][ANNOTATION_RESULT])["phase"] == "Succeeded"

    # After a restart with the Job gone (TTL), the recorded result alone keeps the CR Succeeded.
    cm = {"metadata": {"annotations": patch["metadata"]["annotations"]}}
    again = step(doc, Observed(jobs=[], configmap=cm))
    assert again.status["phase"] == "Succeeded" and not again.create and not again.events
    assert status_changed(doc["status"], again.status) == {}


def test_a_non_finite_metric_from_an_older_stage_never_reaches_the_status_as_nan():
    """kube-apiserver answers 400 to a body holding NaN, so a NaN copied into status would fail every later
    status write of the CR. A stage image of an older release can still write one: it is read as null."""
    doc = cr("Merge", "m", MERGE_SPEC)
    job = step(doc).create[-1]
    name = job["metadata"]["name"]
    message = '{"phase":"Succeeded","outputUri":"pvc://models/merged","digest":"sha256:abc",' \
              '"metrics":{"finalLoss":NaN,"tokens":-Infinity,"tensorsMerged":5}}'
    p = step(doc, Observed(jobs=[finish_job(job, True)], pods={name: [pod(name, message=message)]}))
    assert p.status["phase"] == "Succeeded" and p.status["metrics"]["tensorsMerged"] == 5
    json.dumps(p.status, allow_nan=False)  # strict JSON, as the API server parses it
    json.dumps(p.patch, allow_nan=False)


def test_retryable_failure_backs_off_then_new_attempt_until_limit():
    spec = {**MERGE_SPEC, "runPolicy": {"backoffLimit": 1, "backoffSeconds": 10}}
    doc = cr("Merge", "m", spec)
    job1 = step(doc).create[-1]
    failed = finish_job(job1, False)
    pods = {job1["metadata"]["name"]: [pod(job1["metadata"]["name"], exit_code=137, reason="OOMKilled")]}
    p = step(doc, Observed(jobs=[failed], pods=pods), now=T0 + 2)
    assert ready(p.status)["reason"] == "Retrying" and not p.create and 7 < p.requeue_after <= 8
    assert p.retried == "OOMKilled" and "OOMKilled" in ready(p.status)["message"]
    p = step(doc, Observed(jobs=[failed], pods=pods), now=T0 + 5)  # same wait: counted once, no new Event
    assert p.retried is None and not p.events
    p = step(doc, Observed(jobs=[failed], pods=pods), now=T0 + 11)
    assert [c["metadata"]["name"] for c in p.create] == [job1["metadata"]["name"][:-1] + "2"]
    assert p.status["attempts"] == 2 and ready(p.status)["reason"] == "Started"
    job2 = p.create[-1]
    pods[job2["metadata"]["name"]] = [pod(job2["metadata"]["name"], exit_code=3, message={"error": "endpoint down"})]
    p = step(doc, Observed(jobs=[failed, finish_job(job2, False)], pods=pods), now=T0 + 100)
    assert p.status["phase"] == "Failed" and ready(p.status)["reason"] == "BackoffLimitExceeded"
    assert "endpoint down" in ready(p.status)["message"] and p.finished == "Failed"
    assert get_condition(p.status, "Stalled")["status"] == "True"
    record = {"metadata": {"annotations": p.patch[0][2]["metadata"]["annotations"]}}
    jobs = [failed, finish_job(job2, False)]
    assert not step(doc, Observed(jobs=jobs, pods=pods, configmap=record), now=T0 + 200).events  # pinned
    # raising backoffLimit (an edit of runPolicy: same run) resumes retrying with attempt 3
    doc["spec"]["runPolicy"]["backoffLimit"] = 5
    doc["metadata"]["generation"] = 2
    p = step(doc, Observed(jobs=jobs, pods=pods, configmap=record), now=T0 + 300)
    assert [c["metadata"]["name"][-2:] for c in p.create] == ["-3"] and p.status["phase"] == "Running"


def test_exit_2_is_permanent():
    doc = cr("Merge", "m", MERGE_SPEC)
    job = step(doc).create[-1]
    pods = {job["metadata"]["name"]: [pod(job["metadata"]["name"], exit_code=2,
                                          message={"phase": "Failed", "error": "spec.models[0]: not found"})]}
    p = step(doc, Observed(jobs=[finish_job(job, False)], pods=pods))
    assert p.status["phase"] == "Failed" and ready(p.status)["reason"] == "InvalidSpec" and not p.create
    assert "spec.models[0]: not found" in ready(p.status)["message"] and p.events[0].type == "Warning"


def test_failure_classification():
    job = finish_job({"metadata": {"name": "j"}, "spec": {}}, False)
    assert classify_failure(job, [pod("j", exit_code=2)]).retryable is False
    assert classify_failure(job, [pod("j", exit_code=3)]).reason == "StageRetryable"
    assert classify_failure(job, [pod("j", exit_code=143)]).reason == "Signal"
    assert classify_failure(job, [pod("j", exit_code=137, reason="OOMKilled")]).reason == "OOMKilled"
    pre = classify_failure(job, [pod("j", exit_code=143, disruption="PreemptionByScheduler")])
    assert pre.retryable and pre.reason == "PreemptionByScheduler"
    assert classify_failure(job, [pod("j", exit_code=137, evicted=True)]).reason == "Evicted"
    # one rank exits 2, the others are killed: the permanent cause wins
    assert classify_failure(job, [pod("j", exit_code=143, index=1), pod("j", exit_code=2)]).retryable is False
    deadline = finish_job({"metadata": {"name": "j"}, "spec": {}}, False, reason="DeadlineExceeded")
    assert classify_failure(deadline, []).reason == "DeadlineExceeded" and not classify_failure(deadline, []).retryable
    unknown = classify_failure(job, [])
    assert unknown.retryable and unknown.reason == "BackoffLimitExceeded"
    assert stage_result([pod("j", message="Traceback ...\nValueError")]) is None  # log tail, not JSON


def test_suspend_and_resume_in_flight():
    doc = cr("Merge", "m", MERGE_SPEC)
    job = step(doc).create[-1]
    job["status"] = {"active": 1}
    doc["spec"]["resources"] = {"suspend": True}
    doc["metadata"]["generation"] = 2
    p = step(doc, Observed(jobs=[job]))
    assert p.patch == [("Job", job["metadata"]["name"], {"spec": {"suspend": True}})] and not p.create
    assert p.status["phase"] == "Suspended" and [e.reason for e in p.events] == ["Suspended"]
    job["spec"]["suspend"] = True
    doc["spec"]["resources"] = {"suspend": False}
    doc["metadata"]["generation"] = 3
    p = step(doc, Observed(jobs=[job]))
    assert p.patch == [("Job", job["metadata"]["name"], {"spec": {"suspend": False}})]
    assert p.status["phase"] == "Running" and p.status["observedGeneration"] == 3


def test_created_suspended_and_kueue_queue():
    doc = cr("Merge", "m", {**MERGE_SPEC, "resources": {"suspend": True}})
    p = step(doc)
    assert p.create[-1]["spec"]["suspend"] is True and p.status["phase"] == "Suspended"
    doc = cr("Merge", "q", {**MERGE_SPEC, "resources": {"queueName": "lq"}})
    job = step(doc).create[-1]
    p = step(doc, Observed(jobs=[job]))
    assert p.status["phase"] == "Pending" and ready(p.status)["reason"] == "Queued" and not p.patch


def test_suspend_with_kueue_goes_through_the_workload_never_the_job():
    """Kueue owns Job.spec.suspend of queued Jobs (it unsuspends an admitted one again); its documented stop is
    Workload.spec.active=false, and true again to resume."""
    spec = {**MERGE_SPEC, "resources": {"queueName": "lq"}}
    job = step(cr("Merge", "q", spec)).create[-1]
    job["metadata"]["uid"] = "job-uid"
    job["spec"]["suspend"] = False  # admitted
    workload = {"metadata": {"name": "job-q-1-abcde"}, "spec": {"active": True, "queueName": "lq"}}
    suspended = {**spec, "resources": {"queueName": "lq", "suspend": True}}
    p = step(cr("Merge", "q", suspended), Observed(jobs=[job], workload=workload))
    assert p.patch == [("Workload", "job-q-1-abcde", {"spec": {"active": False}})]
    assert p.status["phase"] == "Suspended"
    # Kueue has evicted it and suspended the Job: nothing more to do while the user keeps it suspended
    job["spec"]["suspend"] = True
    inactive = {**workload, "spec": {"active": False, "queueName": "lq"}}
    p = step(cr("Merge", "q", suspended), Observed(jobs=[job], workload=inactive))
    assert not p.patch and p.status["phase"] == "Suspended"
    # resumed: the Workload is active again and the run waits for readmission
    p = step(cr("Merge", "q", spec), Observed(jobs=[job], workload=inactive))
    assert p.patch == [("Workload", "job-q-1-abcde", {"spec": {"active": True}})]
    assert p.status["phase"] == "Pending" and ready(p.status)["reason"] == "Queued"
    # before Kueue made the Workload there is nothing to deactivate yet: look again soon
    p = step(cr("Merge", "q", suspended), Observed(jobs=[job]))
    assert not p.patch and p.requeue_after == OPTS.pending_recheck_seconds


def test_spec_change_supersedes_the_running_attempt():
    doc = cr("Merge", "m", MERGE_SPEC)
    job = step(doc).create[-1]
    doc["spec"] = {**MERGE_SPEC, "method": "task_arithmetic", "base": {"uri": "pvc://models/base"}}
    doc["metadata"]["generation"] = 2
    p = step(doc, Observed(jobs=[job]))
    assert p.delete == [("Job", job["metadata"]["name"])]
    new_job = p.create[-1]
    assert new_job["metadata"]["name"] != job["metadata"]["name"] and new_job["metadata"]["name"].endswith("-1")
    assert p.status["observedGeneration"] == 2 and p.status["attempts"] == 1
    # runPolicy / suspend edits do not change the run identity
    same = target(cr("Merge", "m", {**MERGE_SPEC, "runPolicy": {"backoffLimit": 9}}), {}, OPTS)
    assert same.run_hash == target(cr("Merge", "m", MERGE_SPEC), {}, OPTS).run_hash


def test_invalid_spec_is_failed_without_children():
    p = step(cr("Merge", "m", {"method": "nope", "models": []}))
    assert p.status["phase"] == "Failed" and ready(p.status)["reason"] == "InvalidSpec" and not p.create
    assert "spec.method" in ready(p.status)["message"]


def test_transition_events_only_on_change():
    assert transition_events({}, {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "False", "reason": "Started", "message": "m"}]})[0].reason == "Started"
    same = {"phase": "Running", "conditions": [{"type": "Ready", "status": "False", "reason": "Started"}]}
    assert transition_events(same, same) == []


def test_acceptance_ratio_from_progress_events_and_results():
    from branchmerge.operator.metrics import acceptance_ratio

    assert acceptance_ratio({"samplesKept": 3, "samplesRejected": {"wrong": 4, "truncated": 1}}) == 3 / 8
    assert acceptance_ratio({"samplesKept": 7, "samplesRejected": 3}) == 0.7
    assert acceptance_ratio({"samplesKept": 0, "samplesRejected": 0}) is None
    assert acceptance_ratio({"tokensPerSecond": 9.0}) is None
