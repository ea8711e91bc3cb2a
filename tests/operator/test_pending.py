"""Why an attempt's pods do not start (operator/pending.py) and what the plan makes of it: the reason on the
CR while it lasts, a look again every recheck, and a permanent failure past the pending deadline. The
inputs are pods and Events as the stand-in cluster writes them (tests/cluster/test_pod_problems.py runs
the same through the operator there)."""
from __future__ import annotations

import json

from branchmerge.api.conditions import get_condition
from branchmerge.operator import pending
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import Observed, plan, target

from .kube_objects import MERGE_SPEC, SFT_SPEC, cr

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


# ---- gangs: a multi-pod attempt is held while any of its pods is ------------------------------------------

def _gang_attempt(created="2026-12-06T10:00:00Z"):
    doc = cr("BranchSFT", "s", SFT_SPEC)
    want = target(doc, {}, OPTS)
    first = plan(doc, {}, Observed(), OPTS, 0.0, want=want)
    doc["status"] = first.status
    job = next(o for o in first.create if o["kind"] == "Job")
    job["metadata"]["creationTimestamp"] = created
    job["status"] = {"active": 2, "ready": 1}
    return doc, want, job


def test_a_partially_placed_gang_is_held_and_fails_past_the_deadline():
    """Rank 0 runs (and waits in the rendezvous), rank 1 cannot be scheduled: before, the ready pod made the
    attempt look Running until torchrun's rendezvous timed out."""
    doc, want, job = _gang_attempt()
    gpus = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    pods = [_pod("s-1-0-abc", phase="Running"), _pod("s-1-1-abc", scheduled=gpus)]
    t0 = 1796551200.0
    held = plan(doc, {}, Observed(jobs=[job], starting_pods=pods), OPTS, t0 + 60, want=want)
    ready = get_condition(held.status, "Ready")
    assert held.status["phase"] == "Running" and ready["reason"] == "Unschedulable"
    assert "1 of 2 pods running" in ready["message"] and gpus in ready["message"]
    assert held.requeue_after == 7 and [(e.type, e.reason) for e in held.events] == [("Warning", "Unschedulable")]
    doc["status"] = held.status
    late = plan(doc, {}, Observed(jobs=[job], starting_pods=pods), OPTS, t0 + 601, want=want)
    assert late.status["phase"] == "Failed" and get_condition(late.status, "Ready")["reason"] == "Unschedulable"
    assert "did not start within 600s: 1 of 2 pods running" in get_condition(late.status, "Ready")["message"]
    assert late.delete == [("Job", job["metadata"]["name"])] and late.finished == "Failed"
    # the whole gang placed (one pod still pulling its image is starting, not held): Running
    both = [_pod("s-1-0-abc", phase="Running"), _pod("s-1-1-abc", waiting={"reason": "ContainerCreating"})]
    assert get_condition(plan(doc, {}, Observed(jobs=[job], starting_pods=both), OPTS, t0 + 601, want=want).status,
                         "Ready")["reason"] == "Running"


def test_the_pending_deadline_runs_from_the_jobs_start_not_its_creation():
    """A Job queued (suspended) for hours starts its pending clock when it is unsuspended (status.startTime)."""
    doc, want, job = _attempt_1()
    t0 = 1796551200.0
    job["status"] = {"active": 1, "startTime": "2026-12-06T12:00:00Z"}  # admitted two hours after creation
    observed = Observed(jobs=[job], starting_pods=[_pod(scheduled="no nodes")])
    held = plan(doc, {}, observed, OPTS, t0 + 7200 + 60, want=want)
    assert held.status["phase"] == "Running" and get_condition(held.status, "Ready")["reason"] == "Unschedulable"
    assert plan(doc, {}, observed, OPTS, t0 + 7200 + 601, want=want).status["phase"] == "Failed"


# ---- Kueue: queued, waiting for quota, or never admissible -----------------------------------------------

OVER = ("couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor default-flavor, "
        "request > maximum capacity (64 > 32)")
SHORT = ("couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor "
         "default-flavor, 32 more needed")


def _workload(message=None, reason="Pending"):
    wl = {"metadata": {"name": "job-s-1-abcde"}, "spec": {"active": True, "queueName": "team-a"}}
    if message is not None:
        wl["status"] = {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": reason,
                                        "message": message}]}
    return wl


def test_kueue_messages_read_as_waiting_or_never():
    assert pending.queue_wait(None) is None and pending.queue_wait(_workload()) is None
    assert pending.queue_wait(_workload(SHORT)) == SHORT and pending.over_capacity(_workload(SHORT)) is None
    over = pending.over_capacity(_workload(OVER))
    assert over.reason == "ExceedsQueueCapacity"
    assert over.message.startswith("asks for 64 nvidia.com/gpu, more than its ClusterQueue can ever admit "
                                   "(32 in flavor default-flavor)") and OVER in over.message
    # Kueue >= 0.14 words it so for a workload of several pod sets; newer Kueue adds a reason of its own
    podsets = ("couldn't assign flavors to pod set workers: insufficient quota for nvidia.com/gpu in flavor gpu, "
               "previously considered podsets requests (16) + current podset request (8) > maximum capacity (16)")
    assert "more nvidia.com/gpu than its ClusterQueue can ever admit (16 in flavor gpu)" in \
        pending.over_capacity(_workload(podsets)).message
    assert pending.over_capacity(_workload("Exceeds max quota", reason="ExceedsMaxQuota")).reason == \
        "ExceedsQueueCapacity"
    uncovered = "couldn't assign flavors to pod set main: resource rdma/ib unavailable in ClusterQueue"
    assert "asks for rdma/ib, which its ClusterQueue has no quota for" in \
        pending.over_capacity(_workload(uncovered)).message
    # several resources: the one over the maximum is named, not a short one listed before it
    both = ("couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor f, 2 more needed, "
            "insufficient quota for nvidia.com/gpu in flavor f, request > maximum capacity (64 > 32)")
    assert pending.over_capacity(_workload(both)).message.startswith("asks for 64 nvidia.com/gpu")


def _queued(spec_resources):
    doc = cr("BranchSFT", "s", {**SFT_SPEC, "resources": {**SFT_SPEC["resources"], **spec_resources}})
    want = target(doc, {}, OPTS)
    first = plan(doc, {}, Observed(), OPTS, 0.0, want=want)
    doc["status"] = first.status
    job = next(o for o in first.create if o["kind"] == "Job")
    job["metadata"]["uid"] = "job-uid"
    assert job["spec"]["suspend"] is True  # created suspended: Kueue admits (unsuspends) it
    return doc, want, job


def test_a_queued_attempt_waits_with_kueues_message_and_no_deadline():
    doc, want, job = _queued({"queueName": "team-a"})
    t0 = 1796551200.0
    early = plan(doc, {}, Observed(jobs=[job], workload=_workload()), OPTS, t0, want=want)
    assert early.status["phase"] == "Pending" and get_condition(early.status, "Ready")["reason"] == "Queued"
    assert early.requeue_after == 7  # Kueue has not said yet whether it fits: look again soon
    waiting = plan(doc, {}, Observed(jobs=[job], workload=_workload(SHORT)), OPTS, t0 + 10 ** 6, want=want)
    ready = get_condition(waiting.status, "Ready")
    assert waiting.status["phase"] == "Pending" and ready["reason"] == "Queued"  # no deadline in a queue
    assert ready["message"] == f"attempt 1 waits for admission by queue team-a: {SHORT}"
    assert not waiting.delete and waiting.requeue_after is None  # admission comes as a Job event (unsuspended)
    assert [(e.type, e.reason) for e in waiting.events] == [("Normal", "Queued")]


def test_a_gang_larger_than_the_queue_fails_at_once():
    doc, want, job = _queued({"queueName": "team-a", "nodes": 8, "gpusPerNode": 8})
    p = plan(doc, {}, Observed(jobs=[job], workload=_workload(OVER)), OPTS, 1796551200.0, want=want)
    ready = get_condition(p.status, "Ready")
    assert p.status["phase"] == "Failed" and ready["reason"] == "ExceedsQueueCapacity"
    assert ready["message"].startswith("attempt 1 can never be admitted by queue team-a: it asks for 64 "
                                       "nvidia.com/gpu, more than its ClusterQueue can ever admit (32 in flavor "
                                       "default-flavor)")
    assert OVER in ready["message"] and get_condition(p.status, "Stalled")["status"] == "True"
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "ExceedsQueueCapacity")]
    # its Job goes (and its Workload with it: no place kept in the queue); the verdict is recorded
    assert p.delete == [("Job", job["metadata"]["name"])] and p.finished == "Failed"
    assert p.patch[0][0] == "ConfigMap" and "ExceedsQueueCapacity" in json.dumps(p.patch[0][2])
    # permanent until the spec changes: the same generation stays Failed, an edit runs again
    doc["status"] = p.status
    assert plan(doc, {}, Observed(jobs=[job]), OPTS, 1796551300.0, want=want).status == p.status
    doc["metadata"]["generation"] = 2
    doc["spec"]["resources"]["nodes"] = 4
    again = plan(doc, {}, Observed(), OPTS, 1796551300.0)
    assert [c["kind"] for c in again.create][-1] == "Job" and again.status["phase"] == "Running"
