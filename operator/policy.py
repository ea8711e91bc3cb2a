"""The lifecycle rules both control planes follow, written once: the kopf operator (operator/plan.py, over
Jobs and pods) and the local runner (operator/local/runner.py, over processes) each observe a stage in
their own terms and ask these pure functions what follows. tests/operator/test_policy_conformance.py runs
one table of event sequences against both drivers.

- Failure classes: exit 2 is permanent (``InvalidSpec``); 3 (``StageRetryable``), a signal (``Signal``),
  an OOM kill, an eviction or a preemption, and any other code (``Error``) are retryable. The class a
  stage reports in its result wins over a launcher's exit code (api/exit_codes.stage_exit_code).
- Attempts that never start (Kubernetes only, operator/plan.py): past the pending deadline (the reason of
  what held the pods, e.g. ``Unschedulable``) or at once when Kueue can never admit the run
  (``ExceedsQueueCapacity``), a non-retryable ``Failure``: another attempt would meet the same wall.
- Retries: a retryable failure of attempt N is retried while N <= ``runPolicy.backoffLimit``, after
  ``backoffSeconds * 2**(N-1)`` seconds, capped (``MAX_BACKOFF_SECONDS``). While it waits the stage is
  ``Running`` with reason ``Retrying``; the next attempt starts ``Running``/``Started``. Past the limit it is
  ``Failed``/``BackoffLimitExceeded``, the last cause in the message.
- Upstreams: a stage whose upstream failed, or is itself stalled by a failed upstream, is ``Waiting`` with
  ``Stalled`` True (reason ``UpstreamFailed``): not terminal, it starts by itself once the upstream is fixed.
  A missing or unfinished upstream is ``Waiting`` (``UpstreamNotFound`` / ``UpstreamNotReady``).
- Suspend: ``spec.resources.suspend`` is ``Suspended``/``Suspended``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..api.exit_codes import EXIT_INVALID, EXIT_RETRYABLE, stage_exit_code
from ..api.timefmt import format_time
from ..api import conditions as C

MAX_BACKOFF_SECONDS = 3600.0


@dataclass(frozen=True)
class Failure:
    retryable: bool
    reason: str  # stable reason for conditions and Events
    message: str
    exit_code: int | None = None


@dataclass(frozen=True)
class AfterFailure:
    """What follows a failed attempt: a terminal status, a wait, or the next attempt now."""

    phase: str
    reason: str
    message: str
    retry_at: float | None = None  # when the next attempt starts (None: now, or never when Failed)

    @property
    def final(self) -> bool:
        return self.phase == "Failed"


def exit_failure(code: int, report: dict | None, detail: str) -> Failure:
    """The class of a process that exited with ``code`` (``report``: the stage's result, if any)."""
    code = stage_exit_code(code, report)
    if code == EXIT_INVALID:
        return Failure(False, C.INVALID_SPEC, f"invalid spec or input: {detail}", code)
    if code >= 128:
        return Failure(True, "Signal", f"killed by signal {code - 128}: {detail}", code)
    if code == EXIT_RETRYABLE:
        return Failure(True, "StageRetryable", detail, code)
    return Failure(True, "Error", f"exited with {code}: {detail}", code)


def backoff_delay(backoff_seconds: float, attempt: int, cap: float = MAX_BACKOFF_SECONDS) -> float:
    """Seconds between the failure of ``attempt`` (1-based) and the next attempt."""
    return min(float(backoff_seconds) * 2 ** max(attempt - 1, 0), cap)


def after_failure(failure: Failure, attempt: int, backoff_limit: int, backoff_seconds: float, failed_at: float,
                  now: float, cap: float = MAX_BACKOFF_SECONDS) -> AfterFailure:
    if not failure.retryable:
        return AfterFailure("Failed", failure.reason, failure.message)
    if attempt > backoff_limit:
        return AfterFailure("Failed", C.BACKOFF_LIMIT_EXCEEDED,
                            f"{attempt} attempt(s) failed, backoffLimit {backoff_limit}; last: {failure.message}")
    due = failed_at + backoff_delay(backoff_seconds, attempt, cap)
    cause = f"attempt {attempt} failed ({failure.reason}: {failure.message}); "
    if now < due:
        return AfterFailure("Running", C.RETRYING, cause + f"attempt {attempt + 1} at {format_time(due)}", due)
    return AfterFailure("Running", C.STARTED, cause + f"attempt {attempt + 1} created")


def effective_phase(status: dict | None) -> str | None:
    """An upstream's phase as its downstreams see it: one stalled by a failed upstream counts as failed, so
    the stall reaches every stage below it, not just the first."""
    status = status or {}
    stalled = C.get_condition(status, "Stalled") or {}
    if status.get("phase") == "Waiting" and stalled.get("status") == "True" and \
            stalled.get("reason") == C.UPSTREAM_FAILED:
        return "Failed"
    return status.get("phase")


def waiting(blockers: list) -> tuple[str, str, str, bool]:
    """(phase, reason, message, stalled) of a stage held back by ``blockers`` (resolve.blockers' answer)."""
    first = blockers[0]
    message = "; ".join(b.message for b in blockers)[:1024]
    return "Waiting", first.reason, message, first.reason == C.UPSTREAM_FAILED
