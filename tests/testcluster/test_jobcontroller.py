"""The Job controller's pure policy (testcluster.jobpolicy.decide) on plain dicts.

``Sim`` plays API server + kubelet in memory: it stores what a Decision creates, applies deletions
(a pod with a finalizer stays, marked for deletion, until its finalizers are gone and it is terminal),
and the tests finish pods by hand.
"""
from __future__ import annotations

import itertools

import pytest

from testcluster import jobapi as ja
from testcluster import jobpolicy as jp

T0 = 1_700_000_000.0


def make_job(name="train", **spec) -> dict:
    template = spec.pop("template", None) or {
        "metadata": {"labels": {"app": "x"}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox"}]}}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "generation": 1},
            "spec": {"template": template, **spec}, "status": {}}


class Sim:
    def __init__(self, job: dict, *, base: float = 10.0, cap: float = 360.0):
        self.job = job
        self.pods: dict[str, dict] = {}
        self.backoff = ja.BackoffRecord()
        self.base, self.cap = base, cap
        self.serial = itertools.count()
        self.history: list[dict] = []  # every status written, in order

    def decide(self, now: float, **kw) -> jp.Decision:
        return jp.decide(self.job, list(self.pods.values()), now, backoff=self.backoff, backoff_base=self.base,
                         backoff_max=self.cap, **kw)

    def step(self, now: float, **kw) -> jp.Decision:
        d = self.decide(now, **kw)
        if d.skipped:
            return d
        for name in d.discard:
            self._unfinalize(name)
            self._delete(name, now)
        for name in d.delete:
            self._delete(name, now)
        for body in d.create:
            n = next(self.serial)
            pod = {**body, "metadata": {**body["metadata"], "name": body["metadata"]["generateName"] + f"p{n:03d}",
                                        "uid": f"pod-uid-{n}", "creationTimestamp": ja.format_time(now)},
                   "status": {"phase": "Pending"}}
            self.pods[pod["metadata"]["name"]] = pod
        if not jp.same_status(self.job["status"], d.interim_status):
            self.job["status"] = d.interim_status
            self.history.append(d.interim_status)
        self.backoff = d.backoff
        for name in d.remove_finalizers:
            self._unfinalize(name)
        if not jp.same_status(self.job["status"], d.status):
            self.job["status"] = d.status
            self.history.append(d.status)
        return d

    def _unfinalize(self, name: str) -> None:
        pod = self.pods.get(name)
        if pod is None:
            return
        pod["metadata"]["finalizers"] = [f for f in pod["metadata"].get("finalizers", [])
                                         if f != ja.JOB_TRACKING_FINALIZER]
        self._gc(name)

    def _delete(self, name: str, now: float) -> None:
        pod = self.pods.get(name)
        if pod is None:
            return
        if not pod["spec"].get("nodeName") or ja.is_terminal(pod):
            if not pod["metadata"].get("finalizers"):
                del self.pods[name]
                return
        pod["metadata"].setdefault("deletionTimestamp", ja.format_time(now))
        pod["metadata"].setdefault("deletionGracePeriodSeconds", 30)

    def _gc(self, name: str) -> None:
        pod = self.pods[name]
        if pod["metadata"].get("deletionTimestamp") and not pod["metadata"].get("finalizers") and (
                ja.is_terminal(pod) or not pod["spec"].get("nodeName")):
            del self.pods[name]

    # the kubelet's part
    def run(self, name: str, now: float, ready: bool = True) -> None:
        pod = self.pods[name]
        pod["spec"]["nodeName"] = "node-1"
        pod["status"] = {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": ja.format_time(now)}],
            "containerStatuses": [{"name": c["name"], "state": {"running": {}}, "restartCount": 0}
                                  for c in pod["spec"]["containers"]]}

    def finish(self, name: str, now: float, exit_code: int = 0, conditions: list[dict] | None = None) -> None:
        pod = self.pods[name]
        pod["spec"].setdefault("nodeName", "node-1")
        pod["status"] = {"phase": "Succeeded" if exit_code == 0 else "Failed",
                         "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": ja.format_time(now)},
                                        *(conditions or [])],
                         "containerStatuses": [{"name": c["name"], "restartCount": 0, "state": {"terminated": {
                             "exitCode": exit_code, "finishedAt": ja.format_time(now)}}}
                             for c in pod["spec"]["containers"]]}
        self._gc(name)

    def names(self, active_only=True) -> list[str]:
        return sorted(n for n, p in self.pods.items() if not active_only or ja.is_active(p))

    def by_index(self, ix: int) -> list[str]:
        return sorted(n for n, p in self.pods.items() if ja.completion_index(p) == ix and ja.is_active(p))

    def types(self) -> list[str]:
        return [c["type"] for c in self.job["status"].get("conditions", [])]


# ---- pieces -------------------------------------------------------------------------------------------

def test_index_intervals_round_trip():
    assert ja.format_indexes([0, 1, 2, 5]) == "0-2,5"
    assert ja.format_indexes([3, 4]) == "3,4"
    assert ja.format_indexes([]) == ""
    assert ja.parse_indexes("0-2,5,7-9", 8) == {0, 1, 2, 5, 7}
    assert ja.parse_indexes("1,x,3", 5) == {1, 3}


def test_backoff_doubles_and_caps():
    assert ja.remaining_backoff(1, T0, T0, 10, 360) == 10
    assert ja.remaining_backoff(3, T0, T0 + 5, 10, 360) == 35
    assert ja.remaining_backoff(20, T0, T0, 10, 360) == 360
    assert ja.remaining_backoff(1, T0, T0 + 11, 10, 360) == 0


def test_pod_template_labels_owner_finalizer_nonindexed():
    sim = Sim(make_job(completions=1))
    d = sim.step(T0)
    assert len(d.create) == 1
    pod = d.create[0]
    meta = pod["metadata"]
    assert meta["generateName"] == "train-"
    assert meta["labels"]["app"] == "x"
    for key, value in (("batch.kubernetes.io/job-name", "train"), ("job-name", "train"),
                       ("batch.kubernetes.io/controller-uid", "uid-train"), ("controller-uid", "uid-train")):
        assert meta["labels"][key] == value
    assert meta["finalizers"] == ["batch.kubernetes.io/job-tracking"]
    assert meta["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": "train",
                                        "uid": "uid-train", "controller": True, "blockOwnerDeletion": True}]
    assert "hostname" not in pod["spec"]
    status = sim.job["status"]
    assert status["active"] == 1 and status["ready"] == 0 and status["terminating"] == 0
    assert status["startTime"] == ja.format_time(T0) and status["uncountedTerminatedPods"] == {}


def test_completions_and_parallelism_success_ordering():
    sim = Sim(make_job(completions=3, parallelism=2))
    assert len(sim.step(T0).create) == 2
    assert len(sim.step(T0 + 1).create) == 0  # level-triggered: nothing more while 2 are active
    first, second = sim.names()
    sim.run(first, T0 + 1)
    sim.run(second, T0 + 1)
    sim.step(T0 + 2)
    assert sim.job["status"]["ready"] == 2
    sim.finish(first, T0 + 3)
    d = sim.step(T0 + 3)
    assert d.interim_status["uncountedTerminatedPods"] == {"succeeded": ["pod-uid-0"]}
    assert d.remove_finalizers == [first] and d.status["succeeded"] == 1
    assert len(d.create) == 1  # min(parallelism, completions - succeeded) = 2 active
    assert not ja.has_tracking_finalizer(sim.pods[first])  # counted: the pod stays, un-tracked
    for name in sim.names():
        sim.finish(name, T0 + 4)
    d = sim.step(T0 + 4)
    assert [c["type"] for c in d.interim_status["conditions"]] == ["SuccessCriteriaMet"]
    assert d.interim_status["conditions"][0]["reason"] == "CompletionsReached"
    assert [c["type"] for c in d.status["conditions"]] == ["SuccessCriteriaMet", "Complete"]
    assert d.status["conditions"][1]["reason"] == "CompletionsReached"
    assert d.status["succeeded"] == 3 and d.status["completionTime"] == ja.format_time(T0 + 4)
    assert "active" not in d.status
    # The SuccessCriteriaMet status was written before Complete.
    assert [c["type"] for c in sim.history[-2]["conditions"]] == ["SuccessCriteriaMet"]
    assert sim.step(T0 + 5).skipped == "finished"


def test_indexed_pods_and_completed_indexes():
    job = make_job(completions=4, parallelism=3, completionMode="Indexed")
    job["spec"]["template"]["spec"]["subdomain"] = "svc"
    sim = Sim(job)
    d = sim.step(T0)
    assert [p["metadata"]["generateName"] for p in d.create] == ["train-0-", "train-1-", "train-2-"]
    pod = d.create[1]
    assert pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"
    assert pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1"
    assert pod["spec"]["hostname"] == "train-1" and pod["spec"]["subdomain"] == "svc"
    assert pod["spec"]["containers"][0]["env"] == [{"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.labels['batch.kubernetes.io/job-completion-index']"}}}]
    sim.finish(sim.by_index(0)[0], T0 + 1)
    sim.finish(sim.by_index(2)[0], T0 + 1)
    d = sim.step(T0 + 1)
    # Indexes are recorded directly (no UIDs) before the finalizers go.
    assert d.interim_status["completedIndexes"] == "0,2" and d.interim_status["succeeded"] == 2
    assert [p["metadata"]["generateName"] for p in d.create] == ["train-3-"]
    for ix in (1, 3):
        sim.finish(sim.by_index(ix)[0], T0 + 2)
    d = sim.step(T0 + 2)
    assert d.status["completedIndexes"] == "0-3" and sim.types() == ["SuccessCriteriaMet", "Complete"]


def test_backoff_limit_with_pod_backoff_then_failure_target_then_failed():
    sim = Sim(make_job(backoffLimit=1))
    sim.step(T0)
    sim.finish(sim.names()[0], T0 + 1, exit_code=1)
    d = sim.step(T0 + 1)
    assert d.status["failed"] == 1 and not d.create
    assert d.requeue_after == pytest.approx(10)
    assert not sim.step(T0 + 6).create  # still backing off
    d = sim.step(T0 + 11)
    assert len(d.create) == 1
    sim.finish(sim.names()[0], T0 + 12, exit_code=1)
    d = sim.step(T0 + 12)
    assert [c["type"] for c in d.interim_status["conditions"]] == ["FailureTarget"]
    assert d.interim_status["conditions"][0]["reason"] == "BackoffLimitExceeded"
    assert [(c["type"], c["reason"]) for c in d.status["conditions"]] == [
        ("FailureTarget", "BackoffLimitExceeded"), ("Failed", "BackoffLimitExceeded")]
    assert d.status["failed"] == 2
    assert "completionTime" not in d.status


def test_second_failure_waits_twice_as_long():
    sim = Sim(make_job(backoffLimit=5), base=2.0)
    sim.step(T0)
    sim.finish(sim.names()[0], T0, exit_code=1)
    assert sim.step(T0).requeue_after == pytest.approx(2)
    sim.step(T0 + 2)
    sim.finish(sim.names()[0], T0 + 2, exit_code=1)
    assert sim.step(T0 + 2).requeue_after == pytest.approx(4)


def pfp_job(**spec) -> dict:
    return make_job(podFailurePolicy={"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [2]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [2]}},
    ]}, **spec)


def test_pod_failure_policy_fail_job_terminates_the_rest_then_fails():
    sim = Sim(pfp_job(completions=2, parallelism=2, backoffLimit=6))
    sim.step(T0)
    a, b = sim.names()
    sim.run(a, T0)
    sim.run(b, T0)
    sim.finish(a, T0 + 1, exit_code=2)
    d = sim.step(T0 + 1)
    assert d.delete == [b]  # the other pod is terminated, its finalizer kept
    target = d.interim_status["conditions"][0]
    assert (target["type"], target["reason"]) == ("FailureTarget", "PodFailurePolicy")
    assert target["message"] == ("Container main for pod ns/" + a +
                                 " failed with exit code 2 matching FailJob rule at index 0")
    assert sim.types() == ["FailureTarget"] and sim.job["status"]["terminating"] == 1
    # Only when no pod is terminating does the Job become Failed.
    assert sim.types() == ["FailureTarget"]
    sim.finish(b, T0 + 2, exit_code=143)
    d = sim.step(T0 + 2)
    assert [(c["type"], c["reason"]) for c in d.status["conditions"]] == [
        ("FailureTarget", "PodFailurePolicy"), ("Failed", "PodFailurePolicy")]
    assert d.status["failed"] == 2 and list(sim.pods) == [a]  # the failed pod stays, un-tracked
    assert not ja.has_tracking_finalizer(sim.pods[a])


def test_pod_failure_policy_ignore_disruption_and_count():
    sim = Sim(pfp_job(backoffLimit=1), base=1.0)
    sim.step(T0)
    sim.finish(sim.names()[0], T0, exit_code=137,
               conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}])
    d = sim.step(T0)
    assert not d.status.get("failed")  # Ignore: not counted
    assert d.requeue_after == pytest.approx(1)  # but the replacement still backs off
    assert len(sim.step(T0 + 1).create) == 1
    sim.finish(sim.names()[0], T0 + 2, exit_code=1)  # Count rule
    d = sim.step(T0 + 2)
    assert d.status["failed"] == 1 and "FailureTarget" not in sim.types()


def test_deleted_running_pod_counts_as_failed_and_is_replaced():
    sim = Sim(make_job(backoffLimit=3), base=0.0)
    sim.step(T0)
    name = sim.names()[0]
    sim.run(name, T0)
    sim._delete(name, T0 + 1)  # e.g. evicted: marked for deletion while running
    d = sim.step(T0 + 1)
    assert d.interim_status["uncountedTerminatedPods"] == {"failed": ["pod-uid-0"]}
    assert d.status["failed"] == 1 and d.status["terminating"] == 1
    assert len(d.create) == 1  # TerminatingOrFailed: replaced while the old one still terminates


def test_with_pod_failure_policy_a_terminating_pod_is_replaced_only_once_failed():
    sim = Sim(pfp_job(), base=0.0)
    sim.step(T0)
    name = sim.names()[0]
    sim.run(name, T0)
    sim._delete(name, T0 + 1)
    d = sim.step(T0 + 1)
    assert not d.create and not d.status.get("failed") and d.status["terminating"] == 1
    sim.finish(name, T0 + 2, exit_code=137, conditions=[{"type": "DisruptionTarget", "status": "True"}])
    d = sim.step(T0 + 2)
    assert not d.status.get("failed") and len(d.create) == 1


def test_backoff_limit_per_index():
    job = make_job(completions=2, parallelism=2, completionMode="Indexed", backoffLimitPerIndex=1,
                   maxFailedIndexes=1)
    sim = Sim(job, base=0.0)
    d = sim.step(T0)
    assert d.create[0]["metadata"]["annotations"]["batch.kubernetes.io/job-index-failure-count"] == "0"
    assert sim.job["status"]["failedIndexes"] == ""
    first = sim.by_index(0)[0]
    sim.finish(first, T0 + 1, exit_code=1)
    d = sim.step(T0 + 1)
    # The failed pod is held (finalizer kept) until its replacement exists, which inherits its count.
    assert first not in d.remove_finalizers
    assert [p["metadata"]["annotations"]["batch.kubernetes.io/job-index-failure-count"] for p in d.create] == ["1"]
    d = sim.step(T0 + 1)
    assert first in d.remove_finalizers and d.status["failed"] == 1
    sim.finish(sim.by_index(0)[0], T0 + 2, exit_code=1)
    d = sim.step(T0 + 2)
    assert d.status["failedIndexes"] == "0" and not d.create  # index 0 is given up
    sim.finish(sim.by_index(1)[0], T0 + 3)
    d = sim.step(T0 + 3)
    assert d.status["completedIndexes"] == "1"
    assert [(c["type"], c["reason"]) for c in d.status["conditions"]] == [
        ("FailureTarget", "FailedIndexes"), ("Failed", "FailedIndexes")]


def test_max_failed_indexes_exceeded():
    job = make_job(completions=3, parallelism=3, completionMode="Indexed", backoffLimitPerIndex=0,
                   maxFailedIndexes=0)
    sim = Sim(job, base=0.0)
    sim.step(T0)
    sim.finish(sim.by_index(1)[0], T0 + 1, exit_code=1)
    d = sim.step(T0 + 1)
    assert d.interim_status["conditions"][0]["reason"] == "MaxFailedIndexesExceeded"
    assert len(d.delete) == 2


def test_fail_index_action():
    job = make_job(completions=2, parallelism=2, completionMode="Indexed", backoffLimitPerIndex=5,
                   podFailurePolicy={"rules": [{"action": "FailIndex",
                                                "onExitCodes": {"operator": "In", "values": [3]}}]})
    sim = Sim(job, base=0.0)
    sim.step(T0)
    sim.finish(sim.by_index(0)[0], T0 + 1, exit_code=3)
    d = sim.step(T0 + 1)
    assert d.status["failedIndexes"] == "0" and not d.create


def test_suspend_and_resume():
    sim = Sim(make_job(completions=2, parallelism=2))
    sim.step(T0)
    for name in sim.names():
        sim.run(name, T0)
    sim.job["spec"]["suspend"] = True
    d = sim.step(T0 + 5)
    assert sorted(d.discard) == sim.names(active_only=False) and not d.delete
    assert d.status.get("failed") is None  # un-tracked first: never counted
    cond = d.status["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"], cond["message"]) == (
        "Suspended", "True", "JobSuspended", "Job suspended")
    assert d.status["startTime"] == ja.format_time(T0)  # kept while suspended
    assert d.status["terminating"] == 2
    for name in list(sim.pods):
        sim.finish(name, T0 + 6, exit_code=143)
    sim.step(T0 + 6)
    assert not sim.pods
    sim.job["spec"]["suspend"] = False
    d = sim.step(T0 + 100)
    cond = d.status["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Suspended", "False", "JobResumed")
    assert d.status["startTime"] == ja.format_time(T0 + 100)  # the deadline clock restarts
    assert len(d.create) == 2 and d.status["active"] == 2


def test_created_suspended_creates_nothing():
    sim = Sim(make_job(suspend=True))
    d = sim.step(T0)
    assert not d.create and "startTime" not in d.status
    assert [(c["type"], c["status"]) for c in d.status["conditions"]] == [("Suspended", "True")]


def test_active_deadline_seconds():
    sim = Sim(make_job(activeDeadlineSeconds=30, completions=1))
    d = sim.step(T0)
    assert d.requeue_after == pytest.approx(30)
    name = sim.names()[0]
    sim.run(name, T0 + 1)
    d = sim.step(T0 + 30)
    assert d.delete == [name]
    assert d.interim_status["conditions"][0]["reason"] == "DeadlineExceeded"
    assert d.interim_status["conditions"][0]["message"] == "Job was active longer than specified deadline"
    assert d.status["failed"] == 1  # the terminated pod counts as failed
    assert sim.types() == ["FailureTarget"]
    sim.finish(name, T0 + 31, exit_code=143)
    sim.step(T0 + 31)
    assert sim.types() == ["FailureTarget", "Failed"]


def test_success_policy():
    job = make_job(completions=3, parallelism=3, completionMode="Indexed",
                   successPolicy={"rules": [{"succeededIndexes": "0", "succeededCount": 1}]})
    sim = Sim(job)
    sim.step(T0)
    for ix in (1, 2):
        sim.run(sim.by_index(ix)[0], T0)
    sim.finish(sim.by_index(0)[0], T0 + 1)
    d = sim.step(T0 + 1)
    cond = d.interim_status["conditions"][0]
    assert (cond["type"], cond["reason"], cond["message"]) == (
        "SuccessCriteriaMet", "SuccessPolicy", "Matched rules at index 0")
    assert len(d.delete) == 2
    assert sim.types() == ["SuccessCriteriaMet"]  # Complete waits for the terminating pods
    for name in list(sim.pods):
        sim.finish(name, T0 + 2, exit_code=143)
    sim.step(T0 + 2)
    assert sim.types() == ["SuccessCriteriaMet", "Complete"]
    assert sim.job["status"]["conditions"][1]["reason"] == "SuccessPolicy"


def test_level_triggered_and_duplicate_indexes_are_removed():
    sim = Sim(make_job(completions=2, parallelism=2, completionMode="Indexed"))
    d1 = sim.decide(T0)
    d2 = sim.decide(T0)
    assert [p["metadata"]["generateName"] for p in d1.create] == [p["metadata"]["generateName"] for p in d2.create]
    assert not sim.decide(T0, satisfied_expectations=False).create  # unobserved creations: wait
    sim.step(T0)
    # Two pods of index 0 (as after a lost expectation): one goes, nothing is created that sync.
    extra = dict(sim.pods[sim.by_index(0)[0]], metadata=dict(sim.pods[sim.by_index(0)[0]]["metadata"],
                                                             name="train-0-dup", uid="dup"))
    sim.pods["train-0-dup"] = extra
    d = sim.step(T0 + 1)
    assert len(d.discard) == 1 and not d.create
    assert len(sim.by_index(0)) == 1


def test_expected_finalizer_removals_are_not_counted_twice():
    sim = Sim(make_job(completions=2, parallelism=1))
    sim.step(T0)
    name = sim.names()[0]
    sim.finish(name, T0 + 1)
    stale = {**sim.pods[name], "metadata": dict(sim.pods[name]["metadata"])}
    sim.step(T0 + 1)
    assert sim.job["status"]["succeeded"] == 1
    # A stale cache still shows the finalizer: the expectation keeps it from being counted again.
    pods = [stale, *sim.pods.values()]
    d = jp.decide(sim.job, pods, T0 + 2, expected_rm_finalizers={stale["metadata"]["uid"]})
    assert d.status["succeeded"] == 1 and not d.remove_finalizers
    d = jp.decide(sim.job, pods, T0 + 2)
    assert d.status["succeeded"] == 2  # without it, it would be


def test_foreign_manager_and_work_queue_job():
    job = make_job()
    job["spec"]["managedBy"] = "kueue.x-k8s.io/multikueue"
    assert jp.decide(job, [], T0).skipped == "managedBy"
    sim = Sim(make_job(parallelism=2))  # no completions: done when one succeeded and none run
    assert len(sim.step(T0).create) == 2
    a, b = sim.names()
    sim.finish(a, T0 + 1)
    d = sim.step(T0 + 1)
    assert not d.create and sim.types() == []
    sim.finish(b, T0 + 2)
    sim.step(T0 + 2)
    assert sim.types() == ["SuccessCriteriaMet", "Complete"]


def test_work_queue_delays_dedups_and_serialises_keys():
    import asyncio

    from testcluster.jobcontroller import WorkQueue

    async def main():
        q = WorkQueue()
        q.add_after("a", 0.05)
        q.add_after("b")
        q.add_after("a", 10)  # the earliest due time wins
        assert await q.get() == "b"
        assert await asyncio.wait_for(q.get(), 1) == "a"
        q.add_after("a")  # re-added while in process: not handed out twice
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(q.get(), 0.1)
        q.done("a")
        assert await asyncio.wait_for(q.get(), 1) == "a"

    asyncio.run(main())
