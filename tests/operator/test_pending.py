"""Why an attempt's pods do not start (operator/pending.py) and what the plan makes of it: the reason on the
CR while it lasts, a look again every recheck, and a permanent failure past the pending deadline. The
inputs are pods and Events as the stand-in cluster writes them (tests/cluster/test_pod_problems.py runs
the same through the operator there)."""
from __future__ import annotations

from branchmerge.operator import pending
from branchmerge.operator.conditions import get_condition
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import Observed, plan, target

from opfixtures import MERGE_SPEC, cr

OPTS = OperatorOptions(pending_deadline_seconds=600, pending_recheck_seconds=7)


def _pod(name="m-1-abc", phase="Pending", waiting=None, scheduled=None):
    status = {"phase": phase}
    if waiting:
        status["containerStatuses"] = [{"name": "stage", "state": {"waiting": waiting}}]
    if scheduled:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": scheduled}]
    return {"metadata": {"name": name, "uid": "pod-uid"}, "status": status}


def _event(reason, message, kind="Job", when="2026-12-06T10:00:00Z"):
    return {"reason": reason, "message": message, "involvedObject": {"kind": kind, "name": "x"},
            "lastTimestamp": when}


def test_problems_read_as_kubectl_describe_shows_them():
    quota = 'Error creating: pods "m-1-" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=8, ' \
            'used: requests.nvidia.com/gpu=0, limited: requests.nvidia.com/gpu=4'
    assert pending.problem([], [_event("FailedCreate", quota)], []) == pending.Problem(
        "QuotaExceeded", quota.removeprefix("Error creating: "))
    sa = 'Error creating: pods "m-1-" is forbidden: error looking up service account ns/x: serviceaccount "x" not found'
    assert pending.problem([], [_event("FailedCreate", sa)], []).reason == "ServiceAccountNotFound"
    pc = 'Error creating: pods "m-1-" is forbidden: no PriorityClass with name urgent was found'
    assert pending.problem([], [_event("FailedCreate", pc)], []).reason == "PriorityClassNotFound"
    assert pending.problem([], [], []) is None  # no pod yet and no refusal: just starting
    gpus = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    assert pending.problem([_pod(scheduled=gpus)], [], []) == pending.Problem("Unschedulable", f"pod m-1-abc: {gpus}")
    pull = pending.problem([_pod(waiting={"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'})], [], [])
    assert pull.reason == "ImagePullBackOff" and 'Back-off pulling image "x"' in pull.message
    secret = pending.problem([_pod(waiting={"reason": "CreateContainerConfigError",
                                            "message": 'secret "hf" not found'})], [], [])
    assert secret.reason == "CreateContainerConfigError" and 'secret "hf" not found' in secret.message
    mount = _event("FailedMount", 'MountVolume.SetUp failed for volume "spec" : configmap "m-1" not found', "Pod")
    assert pending.problem([_pod(waiting={"reason": "ContainerCreating"})], [], [mount]).reason == "FailedMount"
    assert pending.problem([_pod(phase="Running")], [], []) is None


def _attempt_1(created="2026-12-06T10:00:00Z"):
    doc = cr("Merge", "m", MERGE_SPEC)
    want = target(doc, {}, OPTS)
    first = plan(doc, {}, Observed(), OPTS, 0.0, want=want)
    doc["status"] = first.status
    job = next(o for o in first.create if o["kind"] == "Job")
    job["metadata"]["creationTimestamp"] = created
    job["status"] = {"active": 1}
    return doc, want, job


def test_a_held_attempt_shows_its_reason_and_fails_past_the_deadline():
    doc, want, job = _attempt_1()
    gpus = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    observed = Observed(jobs=[job], starting_pods=[_pod(scheduled=gpus)])
    t0 = 1796551200.0  # 2026-12-06T10:00:00Z
    held = plan(doc, {}, observed, OPTS, t0 + 60, want=want)
    ready = get_condition(held.status, "Ready")
    assert held.status["phase"] == "Running" and ready["reason"] == "Unschedulable" and gpus in ready["message"]
    assert held.requeue_after == 7 and [(e.type, e.reason) for e in held.events] == [("Warning", "Unschedulable")]
    doc["status"] = held.status
    late = plan(doc, {}, observed, OPTS, t0 + 601, want=want)
    assert late.status["phase"] == "Failed" and get_condition(late.status, "Ready")["reason"] == "Unschedulable"
    assert "did not start within 600s" in get_condition(late.status, "Ready")["message"]
    assert late.delete == [("Job", job["metadata"]["name"])] and late.finished == "Failed"
    # the decision is recorded in the run's ConfigMap, so a restarted operator keeps it
    assert late.patch and late.patch[0][0] == "ConfigMap"


def test_no_deadline_when_nothing_is_wrong_or_when_it_is_off():
    doc, want, job = _attempt_1()
    t0 = 1796551200.0
    starting = plan(doc, {}, Observed(jobs=[job], starting_pods=[_pod(waiting={"reason": "ContainerCreating"})]),
                    OPTS, t0 + 5000, want=want)
    assert starting.status["phase"] == "Running" and get_condition(starting.status, "Ready")["reason"] == "Started"
    off = OperatorOptions(pending_deadline_seconds=0)
    held = plan(doc, {}, Observed(jobs=[job], starting_pods=[_pod(scheduled="no nodes")]), off, t0 + 10 ** 6, want=want)
    assert held.status["phase"] == "Running" and get_condition(held.status, "Ready")["reason"] == "Unschedulable"
