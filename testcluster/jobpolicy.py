"""The pure part of the Job controller stand-in: what kube-controller-manager's Job controller (batch/v1,
Kubernetes 1.31–1.33 with its default feature gates) decides for one Job, given the Job, the pods it
controls and the time. No I/O: ``decide(job, pods, now)`` returns a ``Decision`` (pods to create, pods
to delete, finalizers to remove, the status to write) that ``testcluster.jobcontroller`` carries out.

Emulated, following pkg/controller/job (syncJob, manageJob, trackJobStatusAndRemoveFinalizers):
- pods from ``spec.template`` with ``generateName`` ``<job>-`` / ``<job>-<index>-``, the owner reference,
  the ``batch.kubernetes.io/job-tracking`` finalizer, Indexed pods' completion-index label + annotation,
  ``hostname`` and the ``JOB_COMPLETION_INDEX`` env var (a downward-API fieldRef, as the real one);
- counting with finalizers: a finished pod's UID goes to ``status.uncountedTerminatedPods`` (or, for
  Indexed Jobs, its index to ``completedIndexes``) BEFORE its finalizer is removed, and moves to the
  counters after — hence the two statuses of a Decision (``interim_status``, then ``status``);
- completions/parallelism (NonIndexed, Indexed, and the work-queue form without completions),
  backoffLimit with the pod-failure backoff (10 s doubling, capped; in memory, like the real one),
  restartPolicy OnFailure restart counting, backoffLimitPerIndex/maxFailedIndexes (with the
  index-failure-count annotations), podFailurePolicy (FailJob, Ignore, Count, FailIndex; onExitCodes,
  onPodConditions), successPolicy, podReplacementPolicy, suspend/resume, activeDeadlineSeconds;
- conditions: FailureTarget then Failed, SuccessCriteriaMet then Complete (the terminal one only once no
  pod is terminating and nothing is uncounted), Suspended True/False; status active, ready,
  terminating, succeeded, failed, startTime (reset on resume, never cleared on suspend), completionTime.

The vocabulary it works with (keys, index sets, spec defaults, pod predicates, podFailurePolicy
matching, backoff, conditions) is ``testcluster.jobapi``.

Not emulated: metrics (Events: testcluster.jobcontroller records them), adoption/orphaning of pods by label selector (pods are matched by
their controller owner reference only), the per-sync cap of 500 uncounted pods, elastic Indexed Jobs
(changing completions), Job ``spec.managedBy`` other than skipping foreign Jobs, and PodGC (which in a
real cluster marks unscheduled terminating pods Failed — relevant to Jobs with a podFailurePolicy).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Iterable

from .jobapi import (COMPLETION_INDEX, COMPLETION_INDEX_ENV, CONTROLLER_NAME, DEFAULT_BACKOFF_BASE,
                     DEFAULT_BACKOFF_MAX, DELETION_COST, INDEX_FAILURE_COUNT, INDEX_IGNORED_FAILURE_COUNT,
                     JOB_TRACKING_FINALIZER, LABEL_CONTROLLER_UID, LABEL_JOB_NAME, LEGACY_CONTROLLER_UID,
                     LEGACY_JOB_NAME, MAX_CREATE_DELETE_PER_SYNC, MAX_GENERATED_NAME_LENGTH, BackoffRecord, JobSpec,
                     annotation_int, completion_index, ensure_condition, find_condition, finished_time,
                     format_indexes, format_time, has_tracking_finalizer, index_absolute_failure_count,
                     index_failure_count, is_active, is_finished, is_pod_failed, is_ready, is_terminating, job_spec,
                     match_pod_failure_policy, meta_of, new_condition, parse_indexes, parse_time, phase,
                     pod_condition, pod_name, pod_uid, remaining_backoff)


# ---- the decision -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Decision:
    create: list[dict] = dataclasses.field(default_factory=list)
    """Pod bodies to POST (``metadata.generateName``; Indexed: the index annotation/label)."""
    delete: list[str] = dataclasses.field(default_factory=list)
    """Pods to DELETE keeping their finalizer: the Job is finishing, their end is still counted."""
    discard: list[str] = dataclasses.field(default_factory=list)
    """Pods to un-track (finalizer removed first) then DELETE: suspension, excess or duplicate pods, never
    counted (the real deleteJobPods)."""
    interim_status: dict = dataclasses.field(default_factory=dict)
    """The status to write before any finalizer is removed (new uncounted UIDs, interim conditions)."""
    remove_finalizers: list[str] = dataclasses.field(default_factory=list)
    """Pods whose tracking finalizer goes once ``interim_status`` is stored."""
    status: dict = dataclasses.field(default_factory=dict)
    """The status once those finalizers are gone (counters, terminal condition)."""
    requeue_after: float | None = None
    backoff: BackoffRecord = dataclasses.field(default_factory=BackoffRecord)
    skipped: str | None = None
    """Why nothing was decided: "finished", "managedBy"."""

    def requeue(self, delay: float) -> None:
        delay = max(0.0, delay)
        self.requeue_after = delay if self.requeue_after is None else min(self.requeue_after, delay)


def _generate_name(job_name: str, index: int | None) -> str:
    if index is None:
        return f"{job_name}-"
    suffix = f"-{index}-"
    prefix = job_name + suffix
    if len(prefix) > MAX_GENERATED_NAME_LENGTH:
        prefix = prefix[:MAX_GENERATED_NAME_LENGTH - len(suffix)] + suffix
    return prefix


def build_pod(job: dict, index: int | None = None, *, replaced: dict | None = None) -> dict:
    """The pod the Job controller creates from ``spec.template`` (``replaced``: the failed pod of the same
    index whose failure counts the new pod inherits, with backoffLimitPerIndex)."""
    spec = job_spec(job)
    meta = meta_of(job)
    template = copy.deepcopy((job.get("spec") or {}).get("template") or {})
    tmeta = template.get("metadata") or {}
    pod_spec = template.get("spec") or {}
    labels = dict(tmeta.get("labels") or {})
    # The API server's Job strategy puts these on the template; add them if a stand-in did not.
    for key, value in ((LABEL_CONTROLLER_UID, meta.get("uid", "")), (LABEL_JOB_NAME, meta.get("name", "")),
                       (LEGACY_CONTROLLER_UID, meta.get("uid", "")), (LEGACY_JOB_NAME, meta.get("name", ""))):
        labels.setdefault(key, value)
    annotations = dict(tmeta.get("annotations") or {})
    finalizers = list(tmeta.get("finalizers") or [])
    if JOB_TRACKING_FINALIZER not in finalizers:
        finalizers.append(JOB_TRACKING_FINALIZER)
    if index is not None:
        for group in ("initContainers", "containers"):
            for container in pod_spec.get(group) or []:
                env = container.setdefault("env", [])
                if not any(e.get("name") == COMPLETION_INDEX_ENV for e in env):
                    env.append({"name": COMPLETION_INDEX_ENV, "valueFrom": {"fieldRef": {
                        "fieldPath": f"metadata.labels['{COMPLETION_INDEX}']"}}})
        annotations[COMPLETION_INDEX] = str(index)
        labels[COMPLETION_INDEX] = str(index)
        pod_spec["hostname"] = f"{meta.get('name')}-{index}"
        if spec.backoff_limit_per_index is not None:
            failures, ignored = 0, 0
            if replaced is not None:
                failures = index_failure_count(replaced)
                ignored = annotation_int(replaced, INDEX_IGNORED_FAILURE_COUNT)
                _, counts, _ = match_pod_failure_policy(spec.pod_failure_policy, replaced)
                if counts:
                    failures += 1
                else:
                    ignored += 1
            annotations[INDEX_FAILURE_COUNT] = str(failures)
            if ignored > 0:
                annotations[INDEX_IGNORED_FAILURE_COUNT] = str(ignored)
    pod_meta = {"generateName": _generate_name(meta.get("name", ""), index), "labels": labels,
                "finalizers": finalizers,
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta.get("name"),
                                     "uid": meta.get("uid"), "controller": True, "blockOwnerDeletion": True}]}
    if meta.get("namespace"):
        pod_meta["namespace"] = meta["namespace"]
    if annotations:
        pod_meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": pod_spec}


def _removal_order(pod: dict) -> tuple:
    """controller.ActivePods: the least valuable pod first (unscheduled, pending, not ready, cheap,
    recently ready, often restarted, young)."""
    ready = is_ready(pod)
    ready_since = parse_time((pod_condition(pod, "Ready") or {}).get("lastTransitionTime")) or 0.0
    restarts = sum(int(st.get("restartCount") or 0) for st in (pod.get("status") or {}).get("containerStatuses") or [])
    try:
        cost = int((meta_of(pod).get("annotations") or {}).get(DELETION_COST, 0))
    except (TypeError, ValueError):
        cost = 0
    return (1 if (pod.get("spec") or {}).get("nodeName") else 0,
            {"Pending": 0, "Unknown": 1, "Running": 2}.get(phase(pod), 0),
            1 if ready else 0, cost, -ready_since if ready else 0.0, -restarts,
            -(parse_time(meta_of(pod).get("creationTimestamp")) or 0.0))


def active_pods_for_removal(spec: JobSpec, active: list[dict], at_least: int) -> list[dict]:
    """Indexed: every pod without a valid index and all but one pod of a repeated index, always; then the
    least valuable pods until ``at_least`` are chosen."""
    rm: list[dict] = []
    left = list(active)
    if spec.indexed:
        left = []
        by_index: dict[int, list[dict]] = {}
        for pod in active:
            ix = completion_index(pod)
            if ix < 0 or ix >= (spec.completions or 0):
                rm.append(pod)
            else:
                by_index.setdefault(ix, []).append(pod)
        for ix in sorted(by_index):
            group = sorted(by_index[ix], key=_removal_order)
            rm.extend(group[:-1])
            left.append(group[-1])
    if len(rm) < at_least:
        left.sort(key=_removal_order)
        rm.extend(left[:at_least - len(rm)])
    return rm


def _first_pending_indexes(count: int, completions: int, non_pending: set[int]) -> list[int]:
    out: list[int] = []
    ix = 0
    while len(out) < count and ix < completions:
        if ix not in non_pending:
            out.append(ix)
        ix += 1
    return out


def _match_success_policy(policy: dict | None, completions: int, succeeded: set[int]) -> str | None:
    if not policy or not succeeded:
        return None
    for number, rule in enumerate(policy.get("rules") or []):
        count = rule.get("succeededCount")
        if rule.get("succeededIndexes") is not None:
            required = parse_indexes(rule["succeededIndexes"], completions)
            if not required:
                continue
            contained = len(required & succeeded)
            if contained == len(required) or (count is not None and contained >= count):
                return f"Matched rules at index {number}"
        elif count is not None and len(succeeded) >= count:
            return f"Matched rules at index {number}"
    return None


def _valid_index(spec: JobSpec, pod: dict) -> bool:
    ix = completion_index(pod)
    return ix >= 0 and ix < (spec.completions or 0)


def _clean_uncounted(status: dict, uids_with_finalizer: set[str]) -> None:
    """Uncounted UIDs whose pod has no finalizer any more (or is gone) move to the counters."""
    unc = status.setdefault("uncountedTerminatedPods", {})
    for key in ("succeeded", "failed"):
        listed = unc.get(key) or []
        kept = [uid for uid in listed if uid in uids_with_finalizer]
        if len(kept) != len(listed):
            status[key] = int(status.get(key) or 0) + len(listed) - len(kept)
        if kept:
            unc[key] = kept
        else:
            unc.pop(key, None)


def _essential(value):
    """A value with empty/zero leaves dropped: what two statuses must agree on to be the same."""
    if isinstance(value, dict):
        out = {k: _essential(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [], 0, "")}
    if isinstance(value, list):
        return [_essential(v) for v in value]
    return value


def same_status(a: dict | None, b: dict | None) -> bool:
    """Whether writing ``b`` over ``a`` would change nothing that matters (0 and absent are alike)."""
    return _essential(a or {}) == _essential(b or {})


def _tidy(status: dict) -> dict:
    """The JSON the real controller writes: zero counters and an empty completedIndexes are omitted."""
    for key in ("active", "succeeded", "failed"):
        if not status.get(key):
            status.pop(key, None)
    if status.get("completedIndexes") == "":
        status.pop("completedIndexes")
    if not status.get("conditions"):
        status.pop("conditions", None)
    return status


def decide(job: dict, pods: list[dict], now: float, *, backoff: BackoffRecord | None = None,
           expected_rm_finalizers: Iterable[str] = (), satisfied_expectations: bool = True,
           backoff_base: float = DEFAULT_BACKOFF_BASE, backoff_max: float = DEFAULT_BACKOFF_MAX) -> Decision:
    """One sync of one Job. ``pods``: the pods it controls (owner reference); ``backoff``: the in-memory
    record from the previous sync; ``expected_rm_finalizers``: UIDs whose finalizer removal the controller
    issued but has not observed yet (skipped, so they are not counted twice); ``satisfied_expectations``:
    false while pods it created or deleted are not in its cache yet (then no pods are created)."""
    spec = job_spec(job)
    backoff = backoff or BackoffRecord()
    status = copy.deepcopy(job.get("status") or {})
    decision = Decision(interim_status=status, status=status, backoff=backoff)
    if is_finished(job):
        decision.skipped = "finished"
        return decision
    if spec.managed_by not in (None, CONTROLLER_NAME):
        decision.skipped = "managedBy"
        return decision
    meta = meta_of(job)
    deleting = bool(meta.get("deletionTimestamp"))
    expected = set(expected_rm_finalizers)
    conditions: list[dict] = status.setdefault("conditions", [])
    unc = status.setdefault("uncountedTerminatedPods", {})
    unc_succeeded, unc_failed = set(unc.get("succeeded") or []), set(unc.get("failed") or [])

    def valid(pod: dict, uncounted: set[str]) -> bool:
        uid = pod_uid(pod)
        if not has_tracking_finalizer(pod) or uid in uncounted or uid in expected:
            return False
        return not spec.indexed or _valid_index(spec, pod)

    active_pods = [p for p in pods if is_active(p)]
    ready = sum(1 for p in active_pods if is_ready(p))
    terminating = sum(1 for p in pods if is_terminating(p))
    new_succeeded = [p for p in pods if valid(p, unc_succeeded) and phase(p) == "Succeeded"]
    new_failed = [p for p in pods if valid(p, unc_failed) and is_pod_failed(p, spec)]
    succeeded = int(status.get("succeeded") or 0) + len(new_succeeded) + len(unc_succeeded)
    failed = int(status.get("failed") or 0) + len(unc_failed) + sum(
        1 for p in new_failed if match_pod_failure_policy(spec.pod_failure_policy, p)[1])

    if not status.get("startTime") and not spec.suspend:
        status["startTime"] = format_time(now)
    decision.backoff = backoff.updated(new_succeeded, new_failed)

    # What finishes the Job, in the real order of precedence.
    finished: dict | None = None
    met = find_condition(conditions, "SuccessCriteriaMet")
    if met is not None and met.get("status") == "True":
        finished = met
    if finished is None:
        target = find_condition(conditions, "FailureTarget")
        if target is not None and target.get("status") == "True":
            finished = new_condition("Failed", "True", target.get("reason", ""), target.get("message", ""), now)
        elif spec.pod_failure_policy is not None:
            for pod in pods:
                if is_pod_failed(pod, spec):
                    message = match_pod_failure_policy(spec.pod_failure_policy, pod)[0]
                    if message is not None:
                        finished = new_condition("FailureTarget", "True", "PodFailurePolicy", message, now)
                        break
    start = parse_time(status.get("startTime"))
    if finished is None:
        if failed > spec.backoff_limit or _past_backoff_limit_on_failure(spec, pods):
            finished = new_condition("FailureTarget", "True", "BackoffLimitExceeded",
                                     "Job has reached the specified backoff limit", now)
        elif spec.active_deadline is not None and start is not None and not spec.suspend:
            left = float(spec.active_deadline) - (now - start)
            if left <= 0:
                finished = new_condition("FailureTarget", "True", "DeadlineExceeded",
                                         "Job was active longer than specified deadline", now)
            else:
                decision.requeue(left)

    prev_succeeded_ix: set[int] = set()
    succeeded_ix: set[int] = set()
    failed_ix: set[int] | None = None
    delayed: dict[int, dict] = {}
    if spec.indexed:
        completions = spec.completions or 0
        prev_succeeded_ix = parse_indexes(status.get("completedIndexes"), completions)
        succeeded_ix = prev_succeeded_ix | {completion_index(p) for p in pods if phase(p) == "Succeeded"
                                            and has_tracking_finalizer(p) and _valid_index(spec, p)}
        succeeded = len(succeeded_ix)
        if spec.backoff_limit_per_index is not None:
            failed_ix = parse_indexes(status.get("failedIndexes"), completions) | {
                completion_index(p) for p in pods
                if has_tracking_finalizer(p) and _valid_index(spec, p) and _is_index_failed(spec, p)}
            if finished is None:
                if spec.max_failed_indexes is not None and len(failed_ix) > spec.max_failed_indexes:
                    finished = new_condition("FailureTarget", "True", "MaxFailedIndexesExceeded",
                                             "Job has exceeded the specified maximal number of failed indexes", now)
                elif failed_ix and len(failed_ix) + len(succeeded_ix) >= completions:
                    finished = new_condition("FailureTarget", "True", "FailedIndexes", "Job has failed indexes", now)
            delayed = _pods_with_delayed_deletion(spec, pods, active_pods, succeeded_ix, failed_ix, expected)
        if finished is None:
            message = _match_success_policy(spec.success_policy, completions, succeeded_ix)
            if message is not None:
                finished = new_condition("SuccessCriteriaMet", "True", "SuccessPolicy", message, now)

    active = len(active_pods)
    if finished is not None:
        # Terminate what still runs, keeping finalizers: their ends are counted below.
        decision.delete = [pod_name(p) for p in active_pods]
        terminating += active
        ready = 0
        active = 0
        if not satisfied_expectations:
            finished = None  # pods may be missing from the cache: decide the end in a later sync
    else:
        managed = False
        if satisfied_expectations and not deleting:
            active, terminating, ready = _manage(job, spec, decision, active_pods, pods, succeeded, terminating,
                                                 ready, succeeded_ix, failed_ix, delayed, now, backoff_base,
                                                 backoff_max)
            managed = True
        if spec.completions is None:
            complete = succeeded > 0 and active == 0
        else:
            complete = succeeded >= spec.completions and active == 0
        if complete:
            finished = new_condition("SuccessCriteriaMet", "True", "CompletionsReached",
                                     "Reached expected number of succeeded pods", now)
        elif managed:
            if spec.suspend:
                ensure_condition(conditions, "Suspended", "True", "JobSuspended", "Job suspended", now)
            elif ensure_condition(conditions, "Suspended", "False", "JobResumed", "Job resumed", now):
                # activeDeadlineSeconds counts continuous activity: the clock restarts on resume.
                status["startTime"] = format_time(now)

    status["active"] = active
    status["ready"] = ready
    status["terminating"] = terminating
    _track(decision, spec, job, pods, status, finished, deleting, expected, unc_succeeded, unc_failed,
           prev_succeeded_ix, succeeded_ix, failed_ix, delayed, terminating, now)
    return decision


def _past_backoff_limit_on_failure(spec: JobSpec, pods: list[dict]) -> bool:
    """restartPolicy OnFailure: the kubelet restarts containers in place; their restarts are the failures."""
    if spec.restart_policy != "OnFailure":
        return False
    restarts = 0
    for pod in pods:
        if phase(pod) in ("Running", "Pending"):
            status = pod.get("status") or {}
            for st in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
                restarts += int(st.get("restartCount") or 0)
    if spec.backoff_limit == 0:
        return restarts > 0
    return restarts >= spec.backoff_limit


def _is_index_failed(spec: JobSpec, pod: dict) -> bool:
    if not is_pod_failed(pod, spec):
        return False
    counted = True
    if spec.pod_failure_policy is not None:
        _, counted, action = match_pod_failure_policy(spec.pod_failure_policy, pod)
        if action == "FailIndex":
            return True
    return counted and index_failure_count(pod) >= (spec.backoff_limit_per_index or 0)


def _pods_with_delayed_deletion(spec: JobSpec, pods: list[dict], active_pods: list[dict], succeeded_ix: set[int],
                                failed_ix: set[int], expected: set[str]) -> dict[int, dict]:
    """Per pending index, the last failed pod, kept (finalizer held) until its replacement exists, so the
    replacement can inherit its failure count."""
    active_ix = {completion_index(p) for p in active_pods}
    out: dict[int, dict] = {}
    for pod in pods:
        if not has_tracking_finalizer(pod) or pod_uid(pod) in expected or not _valid_index(spec, pod):
            continue
        if not is_pod_failed(pod, spec):
            continue
        ix = completion_index(pod)
        if ix in succeeded_ix or ix in failed_ix or ix in active_ix:
            continue
        last = out.get(ix)
        if last is None or (index_absolute_failure_count(last) <= index_absolute_failure_count(pod)
                            and finished_time(pod) >= finished_time(last)):
            out[ix] = pod
    return out


def _manage(job: dict, spec: JobSpec, decision: Decision, active_pods: list[dict], pods: list[dict], succeeded: int,
            terminating: int, ready: int, succeeded_ix: set[int], failed_ix: set[int] | None,
            delayed: dict[int, dict], now: float, backoff_base: float, backoff_max: float) -> tuple[int, int, int]:
    """manageJob: (active, terminating, ready) after the deletions/creations it plans."""
    active = len(active_pods)

    def discard(chosen: list[dict]) -> tuple[int, int, int]:
        decision.discard.extend(pod_name(p) for p in chosen)
        return (active - len(chosen), terminating + len(chosen), ready - sum(1 for p in chosen if is_ready(p)))

    if spec.suspend:
        return discard(active_pods_for_removal(spec, active_pods, active))
    if spec.completions is None:
        want = active if succeeded > 0 else spec.parallelism
    else:
        want = max(0, min(spec.completions - succeeded, spec.parallelism))
    chosen = active_pods_for_removal(spec, active_pods, max(0, active - want))[:MAX_CREATE_DELETE_PER_SYNC]
    if chosen:
        # Deletions and creations never happen in the same sync; deletions first.
        return discard(chosen)
    diff = want - (terminating if spec.only_replace_failed else 0) - active
    if diff <= 0:
        return active, terminating, ready
    if spec.backoff_limit_per_index is None:
        wait = decision.backoff.remaining(now, backoff_base, backoff_max)
        if wait > 0:
            decision.requeue(wait)
            return active, terminating, ready
    diff = min(diff, MAX_CREATE_DELETE_PER_SYNC)
    indexes: list[int | None] = [None] * diff
    if spec.indexed:
        non_pending = set(succeeded_ix) | {completion_index(p) for p in active_pods}
        if spec.only_replace_failed:
            non_pending |= {completion_index(p) for p in pods if is_terminating(p)}
        if failed_ix:
            non_pending |= failed_ix
        pending = _first_pending_indexes(diff, spec.completions or 0, non_pending)
        if spec.backoff_limit_per_index is not None:
            now_ok, waits = [], []
            for ix in pending:
                last = delayed.get(ix)
                wait = 0.0 if last is None else remaining_backoff(
                    index_absolute_failure_count(last) + 1, finished_time(last), now, backoff_base, backoff_max)
                (now_ok if wait == 0 else waits).append(ix if wait == 0 else wait)
            if not now_ok and waits:
                decision.requeue(min(waits))
                return active, terminating, ready
            pending = now_ok
        indexes = list(pending)
    for ix in indexes:
        decision.create.append(build_pod(job, ix, replaced=delayed.get(ix) if ix is not None else None))
    return active + len(indexes), terminating, ready


def _track(decision: Decision, spec: JobSpec, job: dict, pods: list[dict], status: dict, finished: dict | None,
           deleting: bool, expected: set[str], unc_succeeded: set[str], unc_failed: set[str],
           prev_succeeded_ix: set[int], succeeded_ix: set[int], failed_ix: set[int] | None,
           delayed: dict[int, dict], terminating: int, now: float) -> None:
    """trackJobStatusAndRemoveFinalizers: record finished pods, pick the finalizers to remove, then the
    counters and the terminal condition as they will be once those finalizers are gone."""
    conditions = status["conditions"]
    with_finalizer = {pod_uid(p) for p in pods if has_tracking_finalizer(p) and pod_uid(p) not in expected}
    _clean_uncounted(status, with_finalizer)
    unc = status["uncountedTerminatedPods"]
    pods_sorted = sorted(pods, key=completion_index) if spec.indexed else list(pods)
    new_succeeded_ix: set[int] = set()
    removing: list[dict] = []
    for pod in pods_sorted:
        uid = pod_uid(pod)
        if not has_tracking_finalizer(pod) or uid in expected:
            continue  # processed in an earlier sync
        considered_failed = is_pod_failed(pod, spec)
        if not (deleting or finished is not None or phase(pod) == "Succeeded"):
            if not considered_failed:
                continue
            if spec.backoff_limit_per_index is not None:
                held = delayed.get(completion_index(pod))
                if held is not None and pod_uid(held) == uid:
                    continue  # kept until the index's replacement pod exists
        removing.append(pod)
        if phase(pod) == "Succeeded" and uid not in unc_failed:
            if spec.indexed:
                ix = completion_index(pod)
                if _valid_index(spec, pod) and ix not in prev_succeeded_ix:
                    new_succeeded_ix.add(ix)
            elif uid not in unc_succeeded:
                unc.setdefault("succeeded", []).append(uid)
        elif considered_failed or (finished is not None and finished.get("type") != "SuccessCriteriaMet"):
            # Once the Job is failing, every pod that did not succeed counts as failed.
            if uid not in unc_failed and (not spec.indexed or _valid_index(spec, pod)):
                if match_pod_failure_policy(spec.pod_failure_policy, pod)[1]:
                    unc.setdefault("failed", []).append(uid)
    if spec.indexed:
        succeeded_ix = succeeded_ix | new_succeeded_ix
        status["succeeded"] = len(succeeded_ix)
        status["completedIndexes"] = format_indexes(succeeded_ix)
        if failed_ix is not None:
            status["failedIndexes"] = format_indexes(failed_ix)
        else:
            status.pop("failedIndexes", None)
    if finished is not None and finished.get("type") == "FailureTarget":
        conditions.append(finished)
        finished = new_condition("Failed", "True", finished.get("reason", ""), finished.get("message", ""), now)
    if finished is not None and finished.get("type") == "SuccessCriteriaMet":
        existing = find_condition(conditions, "SuccessCriteriaMet")
        if existing is None or existing.get("status") != "True":
            conditions.append(finished)
        finished = new_condition("Complete", "True", finished.get("reason", ""), finished.get("message", ""), now)
    decision.interim_status = _tidy(copy.deepcopy(status))
    decision.remove_finalizers = [pod_name(p) for p in removing]
    final = copy.deepcopy(status)
    _clean_uncounted(final, with_finalizer - {pod_uid(p) for p in removing})
    counted_all = not final["uncountedTerminatedPods"]
    if finished is not None and counted_all and terminating == 0:
        ensure_condition(final["conditions"], finished["type"], "True", finished.get("reason", ""),
                         finished.get("message", ""), now)
        if finished["type"] == "Complete":
            final["completionTime"] = finished["lastTransitionTime"]
    decision.status = _tidy(final)
