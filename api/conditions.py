"""Status conditions and phases, shared by both control planes (pure functions over plain dicts).

Conditions follow metav1.Condition and Flux kstatus: ``Ready`` (True only when Succeeded),
``Reconciling`` (True while work is under way), ``Stalled`` (True when it cannot make progress without
a change: permanent failure, failed upstream). Reasons are stable CamelCase strings listed here.
"""
from __future__ import annotations

from .common import TERMINAL
from .timefmt import format_time

# Stable reasons (also used as Kubernetes Event reasons).
CREATED = "Created"
UPSTREAM_NOT_FOUND = "UpstreamNotFound"
UPSTREAM_NOT_READY = "UpstreamNotReady"
UPSTREAM_FAILED = "UpstreamFailed"
STARTED = "Started"
RUNNING = "Running"
SUSPENDED = "Suspended"
SUCCEEDED = "Succeeded"
RETRYING = "Retrying"
INVALID_SPEC = "InvalidSpec"
FAILED = "Failed"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
DEADLINE_EXCEEDED = "DeadlineExceeded"
CACHED = "Cached"
INTERRUPTED = "Interrupted"


def get_condition(status: dict, ctype: str) -> dict | None:
    return next((c for c in status.get("conditions", []) if c.get("type") == ctype), None)


def set_condition(status: dict, ctype: str, value: bool | None, reason: str, message: str = "",
                  generation: int | None = None) -> dict:
    """Set one condition in place; lastTransitionTime changes only when the status value changes."""
    text = "Unknown" if value is None else ("True" if value else "False")
    conditions = status.setdefault("conditions", [])
    current = get_condition(status, ctype)
    if current is None:
        current = {"type": ctype}
        conditions.append(current)
    if current.get("status") != text:
        current["lastTransitionTime"] = format_time()
    current.update(status=text, reason=reason, message=message)
    if generation is not None:
        current["observedGeneration"] = generation
    return status


def set_phase(status: dict, phase: str, reason: str, message: str = "", generation: int | None = None,
              stalled: bool = False) -> dict:
    """Move to ``phase`` and set Ready/Reconciling/Stalled consistently with it. ``stalled``: a non-terminal
    phase that cannot progress without a change elsewhere (a failed upstream): Stalled True, not Reconciling."""
    status["phase"] = phase
    if generation is not None:
        status["observedGeneration"] = generation
    ready = phase == "Succeeded"
    reconciling = phase in ("Pending", "Waiting", "Running") and not stalled
    stalled = stalled or phase == "Failed"
    set_condition(status, "Ready", ready, reason, message, generation)
    set_condition(status, "Reconciling", reconciling, reason if reconciling else SUCCEEDED if ready else reason,
                  message if reconciling else "", generation)
    set_condition(status, "Stalled", stalled, reason if stalled else "NotStalled", message if stalled else "",
                  generation)
    if phase == "Running" and not status.get("startTime"):
        status["startTime"] = format_time()
    if phase in TERMINAL and not status.get("completionTime"):
        status["completionTime"] = format_time()
    return status
