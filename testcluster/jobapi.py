"""The batch/v1 vocabulary the Job controller stand-in reads and writes, as pure functions on plain
dicts: label/annotation/finalizer keys, timestamps, completed/failed index sets ("0-2,5"), a Job's spec
with the API server's defaults, pod predicates (active, terminating, ready, failed, finish time),
podFailurePolicy rule matching, the pod-failure backoff and Job conditions. ``jobpolicy`` decides with
them; ``jobcontroller`` and ``ttl`` use them to read objects.

Not emulated: the PodDeletionCost ordering beyond the annotation value, and field validation (the API
server stand-in validates Jobs; malformed values here fall back to the real controller's defaults).
"""
from __future__ import annotations

import dataclasses
import datetime
from typing import Iterable

JOB_TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"
LABEL_CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
LEGACY_JOB_NAME = "job-name"
LEGACY_CONTROLLER_UID = "controller-uid"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
INDEX_FAILURE_COUNT = "batch.kubernetes.io/job-index-failure-count"
INDEX_IGNORED_FAILURE_COUNT = "batch.kubernetes.io/job-index-ignored-failure-count"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
CONTROLLER_NAME = "kubernetes.io/job-controller"
MAX_INT32 = 2**31 - 1
MAX_CREATE_DELETE_PER_SYNC = 500
MAX_GENERATED_NAME_LENGTH = 58  # 63 minus the 5 random characters the API server appends

# The real default pod-failure backoff; the cap is the documented six minutes.
DEFAULT_BACKOFF_BASE = 10.0
DEFAULT_BACKOFF_MAX = 360.0


# ---- time ---------------------------------------------------------------------------------------------

def format_time(t: float) -> str:
    """metav1.Time: RFC 3339, whole seconds, UTC."""
    return datetime.datetime.fromtimestamp(int(t), tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# ---- index sets in the API's compressed form ("0-2,5") -----------------------------------------------

def parse_indexes(text: str | None, completions: int) -> set[int]:
    """Like the real parser: corrupt intervals are skipped, parsing stops at the first index out of range."""
    out: set[int] = set()
    if not text:
        return out
    for part in text.split(","):
        bounds = part.split("-")
        try:
            first = int(bounds[0])
            last = int(bounds[1]) if len(bounds) > 1 else first
        except ValueError:
            continue
        if first >= completions:
            break
        out.update(range(first, min(last, completions - 1) + 1))
    return out


def format_indexes(indexes: Iterable[int]) -> str:
    """Intervals of three or more as "a-b", a pair as "a,b" (the real String())."""
    parts: list[str] = []
    run: list[int] = []
    for ix in sorted(set(indexes)):
        if run and ix == run[-1] + 1:
            run.append(ix)
            continue
        if run:
            parts.append(_interval(run))
        run = [ix]
    if run:
        parts.append(_interval(run))
    return ",".join(parts)


def _interval(run: list[int]) -> str:
    if len(run) == 1:
        return str(run[0])
    if len(run) == 2:
        return f"{run[0]},{run[1]}"
    return f"{run[0]}-{run[-1]}"


# ---- the Job's spec, with the API server's defaults for fields a client left out ----------------------

@dataclasses.dataclass(frozen=True)
class JobSpec:
    parallelism: int
    completions: int | None
    backoff_limit: int
    indexed: bool
    suspend: bool
    active_deadline: float | None
    pod_failure_policy: dict | None
    backoff_limit_per_index: int | None
    max_failed_indexes: int | None
    only_replace_failed: bool
    success_policy: dict | None
    restart_policy: str
    managed_by: str | None


def job_spec(job: dict) -> JobSpec:
    spec = job.get("spec") or {}
    completions, parallelism = spec.get("completions"), spec.get("parallelism")
    if completions is None and parallelism is None:
        completions = 1
    blpi = spec.get("backoffLimitPerIndex")
    backoff_limit = spec.get("backoffLimit")
    if backoff_limit is None:
        backoff_limit = MAX_INT32 if blpi is not None else 6
    pfp = spec.get("podFailurePolicy")
    indexed = spec.get("completionMode") == "Indexed"
    return JobSpec(
        parallelism=1 if parallelism is None else int(parallelism),
        completions=None if completions is None else int(completions),
        backoff_limit=int(backoff_limit),
        indexed=indexed,
        suspend=bool(spec.get("suspend")),
        active_deadline=spec.get("activeDeadlineSeconds"),
        pod_failure_policy=pfp,
        backoff_limit_per_index=blpi if indexed else None,
        max_failed_indexes=spec.get("maxFailedIndexes"),
        # podReplacementPolicy defaults to Failed with a podFailurePolicy, else TerminatingOrFailed.
        only_replace_failed=pfp is not None or spec.get("podReplacementPolicy") == "Failed",
        success_policy=spec.get("successPolicy") if indexed else None,
        restart_policy=(((spec.get("template") or {}).get("spec") or {}).get("restartPolicy") or "Always"),
        managed_by=spec.get("managedBy"),
    )


# ---- pods ---------------------------------------------------------------------------------------------

def meta_of(obj: dict) -> dict:
    return obj.get("metadata") or {}


def pod_uid(pod: dict) -> str:
    return meta_of(pod).get("uid", "")


def pod_name(pod: dict) -> str:
    return meta_of(pod).get("name", "")


def phase(pod: dict) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


def is_terminal(pod: dict) -> bool:
    return phase(pod) in ("Succeeded", "Failed")


def is_active(pod: dict) -> bool:
    """controller.FilterActivePods: not terminal and not being deleted."""
    return not is_terminal(pod) and not meta_of(pod).get("deletionTimestamp")


def is_terminating(pod: dict) -> bool:
    return not is_terminal(pod) and bool(meta_of(pod).get("deletionTimestamp"))


def pod_condition(pod: dict, type_: str) -> dict | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def is_ready(pod: dict) -> bool:
    cond = pod_condition(pod, "Ready")
    return bool(cond) and cond.get("status") == "True"


def has_tracking_finalizer(pod: dict) -> bool:
    return JOB_TRACKING_FINALIZER in (meta_of(pod).get("finalizers") or [])


def completion_index(pod: dict) -> int:
    """-1 when absent or not a non-negative integer (the real unknownCompletionIndex)."""
    value = (meta_of(pod).get("annotations") or {}).get(COMPLETION_INDEX)
    try:
        ix = int(value)
    except (TypeError, ValueError):
        return -1
    return ix if ix >= 0 else -1


def controller_ref(obj: dict) -> dict | None:
    for ref in meta_of(obj).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def controller_uid(pod: dict) -> str | None:
    """The uid of the batch/v1 Job controlling this pod, if any."""
    ref = controller_ref(pod)
    if ref and ref.get("kind") == "Job" and ref.get("apiVersion") == "batch/v1":
        return ref.get("uid")
    return None


def annotation_int(pod: dict, key: str) -> int:
    try:
        value = int((meta_of(pod).get("annotations") or {}).get(key, 0))
    except (TypeError, ValueError):
        return 0
    return value if 0 <= value <= MAX_INT32 else 0


def index_failure_count(pod: dict) -> int:
    return annotation_int(pod, INDEX_FAILURE_COUNT)


def index_absolute_failure_count(pod: dict) -> int:
    return annotation_int(pod, INDEX_FAILURE_COUNT) + annotation_int(pod, INDEX_IGNORED_FAILURE_COUNT)


def is_pod_failed(pod: dict, spec: JobSpec) -> bool:
    """A Failed pod; or, unless only Failed pods are replaced, one being deleted before it succeeded
    (so that pods deleted from under the Job — node loss, eviction — count as failures)."""
    if phase(pod) == "Failed":
        return True
    if spec.only_replace_failed:
        return False
    return bool(meta_of(pod).get("deletionTimestamp")) and phase(pod) != "Succeeded"


def finished_time(pod: dict) -> float:
    """Latest container finish; else the Ready=False transition; else the deletion's start; else creation."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    latest: float | None = None
    for st in statuses:
        term = (st.get("state") or {}).get("terminated")
        at = parse_time((term or {}).get("finishedAt"))
        if at is None:
            latest = None
            break
        latest = at if latest is None else max(latest, at)
    if statuses and latest is not None:
        return latest
    ready = pod_condition(pod, "Ready")
    if ready and ready.get("status") == "False":
        at = parse_time(ready.get("lastTransitionTime"))
        if at is not None:
            return at
    deleted = parse_time(meta_of(pod).get("deletionTimestamp"))
    if deleted is not None:
        return deleted - float(meta_of(pod).get("deletionGracePeriodSeconds") or 0)
    return parse_time(meta_of(pod).get("creationTimestamp")) or 0.0


# ---- podFailurePolicy ---------------------------------------------------------------------------------

def _exit_code_matches(code: int, req: dict) -> bool:
    values = req.get("values") or []
    if req.get("operator") == "In":
        return code in values
    if req.get("operator") == "NotIn":
        return code not in values
    return False


def _matching_container(statuses: list[dict], req: dict) -> dict | None:
    for st in statuses or []:
        term = (st.get("state") or {}).get("terminated")
        if term is None:
            continue  # still terminating: no exit code to match
        if req.get("containerName") not in (None, st.get("name")):
            continue
        code = int(term.get("exitCode") or 0)
        if code != 0 and _exit_code_matches(code, req):  # exit code 0 never matches a rule
            return st
    return None


def match_pod_failure_policy(policy: dict | None, pod: dict) -> tuple[str | None, bool, str | None]:
    """(FailJob message or None, whether the failure counts towards the backoff limits, action or None)
    for the first matching rule, in order."""
    if policy is None:
        return None, True, None
    status = pod.get("status") or {}
    meta = meta_of(pod)
    for number, rule in enumerate(policy.get("rules") or []):
        action = rule.get("action")
        message = None
        if rule.get("onExitCodes") is not None:
            req = rule["onExitCodes"]
            st = (_matching_container(status.get("containerStatuses"), req)
                  or _matching_container(status.get("initContainerStatuses"), req))
            if st is None:
                continue
            message = (f"Container {st.get('name')} for pod {meta.get('namespace')}/{meta.get('name')} failed "
                       f"with exit code {st['state']['terminated'].get('exitCode')} matching {action} rule at "
                       f"index {number}")
        elif rule.get("onPodConditions") is not None:
            matched = None
            for cond in status.get("conditions") or []:
                for pattern in rule["onPodConditions"]:
                    if cond.get("type") == pattern.get("type") and cond.get("status") == pattern.get("status",
                                                                                                       "True"):
                        matched = cond
                        break
                if matched:
                    break
            if matched is None:
                continue
            message = (f"Pod {meta.get('namespace')}/{meta.get('name')} has condition {matched.get('type')} "
                       f"matching {action} rule at index {number}")
        else:
            continue
        if action == "Ignore":
            return None, False, "Ignore"
        if action == "FailIndex":
            return None, True, "FailIndex"
        if action == "Count":
            return None, True, "Count"
        if action == "FailJob":
            return message, True, "FailJob"
    return None, True, None


# ---- pod-failure backoff (kept in memory by the controller, like the real backoffStore) -------------

@dataclasses.dataclass(frozen=True)
class BackoffRecord:
    failures_after_last_success: int = 0
    last_failure_time: float | None = None

    def updated(self, new_succeeded: list[dict], new_failed: list[dict]) -> "BackoffRecord":
        if not new_failed:
            return self if not new_succeeded else BackoffRecord()
        failed_times = sorted(finished_time(p) for p in new_failed)
        if not new_succeeded:
            return BackoffRecord(self.failures_after_last_success + len(new_failed), failed_times[-1])
        last_success = max(finished_time(p) for p in new_succeeded)
        after = [t for t in failed_times if t > last_success]
        return BackoffRecord(len(after), after[-1] if after else None)

    def remaining(self, now: float, base: float, cap: float) -> float:
        return remaining_backoff(self.failures_after_last_success, self.last_failure_time, now, base, cap)


def remaining_backoff(failures: int, last_failure: float | None, now: float, base: float, cap: float) -> float:
    if failures <= 0 or last_failure is None:
        return 0.0
    delay = base
    for _ in range(1, failures):
        delay *= 2
        if delay >= cap:
            delay = cap
            break
    return max(0.0, delay - (now - last_failure))


# ---- conditions ---------------------------------------------------------------------------------------

def new_condition(type_: str, status: str, reason: str, message: str, now: float) -> dict:
    cond = {"type": type_, "status": status, "lastProbeTime": format_time(now),
            "lastTransitionTime": format_time(now)}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def find_condition(conditions: list[dict], type_: str) -> dict | None:
    for cond in conditions:
        if cond.get("type") == type_:
            return cond
    return None


def ensure_condition(conditions: list[dict], type_: str, status: str, reason: str, message: str,
                     now: float) -> bool:
    """Update in place or append; a False condition is never appended (nothing → False is meaningless)."""
    cond = find_condition(conditions, type_)
    if cond is not None:
        if (cond.get("status"), cond.get("reason", ""), cond.get("message", "")) != (status, reason, message):
            cond.clear()
            cond.update(new_condition(type_, status, reason, message, now))
            return True
        return False
    if status != "False":
        conditions.append(new_condition(type_, status, reason, message, now))
        return True
    return False


def is_finished(job: dict) -> bool:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return True
    return False


def finish_time(job: dict) -> float | None:
    """When the Job finished: its Complete/Failed condition's transition (the TTL controller's clock)."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return parse_time(cond.get("lastTransitionTime"))
    return None
