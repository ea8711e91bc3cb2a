"""What a finished Job says: its state, the stage's result (termination message) and, when it failed,
whether running again can help. Pure functions over Job/Pod dicts.

Classes: the shared policy's (operator/policy.py: exit 2 permanent, 3, signals and other codes retryable),
plus what only pods have: OOMKilled, eviction, preemption (pod condition DisruptionTarget) are retryable;
the Job's activeDeadlineSeconds running out is permanent (the next attempt would time out again).
"""
from __future__ import annotations

from ..api import finite as finite_json
from ..api.exit_codes import EXIT_INVALID
from ..api import conditions as C
from .policy import Failure, exit_failure
from .pods.distributed import COMPLETION_INDEX_ANNOTATION
from .pods.job import MAIN_CONTAINER

ACTIVE, SUCCEEDED, FAILED, SUSPENDED = "Active", "Succeeded", "Failed", "Suspended"


def _condition(obj: dict, ctype: str) -> dict | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


def job_state(job: dict) -> str:
    if _condition(job, "Complete") or _condition(job, "SuccessCriteriaMet"):
        return SUCCEEDED
    if _condition(job, "Failed") or _condition(job, "FailureTarget"):
        return FAILED
    if job.get("spec", {}).get("suspend"):
        return SUSPENDED
    return ACTIVE


def finished_at(job: dict) -> str | None:
    """When the Job finished (completionTime, else the terminal condition's transition time)."""
    status = job.get("status", {})
    if status.get("completionTime"):
        return status["completionTime"]
    for ctype in ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"):
        cond = _condition(job, ctype)
        if cond and cond.get("lastTransitionTime"):
            return cond["lastTransitionTime"]
    return None


def _main_terminated(pod: dict) -> dict | None:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        if cs.get("name") == MAIN_CONTAINER:
            return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
    return None


def _init_failure(pod: dict) -> tuple[str, dict] | None:
    for cs in pod.get("status", {}).get("initContainerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term and term.get("exitCode", 0) != 0:
            return cs.get("name", "init"), term
    return None


def _pod_index(pod: dict) -> int:
    annotations = pod.get("metadata", {}).get("annotations") or {}
    try:
        return int(annotations.get(COMPLETION_INDEX_ANNOTATION, 0))
    except ValueError:
        return 0


def parse_message(text: str | None) -> dict | None:
    """The stage's compact JSON result, or None (e.g. a log tail from FallbackToLogsOnError)."""
    if not text:
        return None
    try:
        value = finite_json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def stage_result(pods: list[dict]) -> dict | None:
    """The result written by rank 0 (pod index 0) of a finished attempt."""
    for pod in sorted(pods, key=_pod_index):
        term = _main_terminated(pod)
        if term:
            result = parse_message(term.get("message"))
            if result is not None:
                return result
    return None


def _tail(text: str | None, limit: int = 300) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def classify_failure(job: dict, pods: list[dict]) -> Failure:
    """Why an attempt failed and whether another attempt may succeed."""
    failed = _condition(job, "Failed") or _condition(job, "FailureTarget") or {}
    if failed.get("reason") == "DeadlineExceeded":
        return Failure(False, C.DEADLINE_EXCEEDED, failed.get("message") or "activeDeadlineSeconds exceeded")
    retryable: list[Failure] = []
    for pod in sorted(pods, key=_pod_index):
        name = pod.get("metadata", {}).get("name", "?")
        term = _main_terminated(pod)
        if term is not None:
            result = parse_message(term.get("message")) or {}
            code = int(term.get("exitCode", 0))
            detail = result.get("error") or _tail(term.get("message")) or term.get("reason") or ""
            failure = exit_failure(code, result, detail)
            if term.get("reason") == "OOMKilled":
                retryable.append(Failure(True, "OOMKilled", f"pod {name} was killed for running out of memory", code))
            elif code != 0:
                failure = Failure(failure.retryable, failure.reason, f"pod {name}: {failure.message}", failure.exit_code)
                if not failure.retryable:
                    return failure
                retryable.append(failure)
        disruption = _condition(pod, "DisruptionTarget")
        if disruption is not None:  # preemption, eviction, node drain: not the stage's fault
            retryable.insert(0, Failure(True, disruption.get("reason") or "Disrupted",
                                        f"pod {name} was disrupted: {disruption.get('message', '')}".strip()))
        elif pod.get("status", {}).get("reason") == "Evicted":
            retryable.insert(0, Failure(True, "Evicted", f"pod {name} was evicted: "
                                                         f"{pod['status'].get('message', '')}".strip()))
        init = _init_failure(pod)
        if init and term is None:
            cname, iterm = init
            if iterm.get("exitCode") == EXIT_INVALID:  # e.g. staging: the repository or revision does not exist
                return Failure(False, C.INVALID_SPEC, f"pod {name}: init container {cname}: "
                                                      f"{_tail(iterm.get('message'))}", EXIT_INVALID)
            retryable.append(Failure(True, "InitFailed", f"pod {name}: init container {cname} exited with "
                                                         f"{iterm.get('exitCode')}: {_tail(iterm.get('message'))}"))
    if retryable:
        return retryable[0]
    reason = failed.get("reason") or "Unknown"
    return Failure(True, reason, f"attempt failed ({reason}: {failed.get('message', 'no pod status left')})")
