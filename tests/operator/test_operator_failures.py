"""The stage's exit class reaches the control planes whatever launcher wraps it (operator/failures.py,
api/exit_codes.py stage_exit_code). Pure functions over the pod status a kubelet reports."""
from __future__ import annotations

import json

from branchmerge.api.exit_codes import stage_exit_code
from branchmerge.operator.failures import classify_failure

FAILED_JOB = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}


def _pod(name: str, exit_code: int, message: str | None = None, reason: str = "Error") -> dict:
    term = {"exitCode": exit_code, "reason": reason, **({"message": message} if message is not None else {})}
    return {"metadata": {"name": name},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "stage", "state": {"terminated": term}}]}}


def test_the_reported_class_wins_over_the_launchers_exit_code():
    assert stage_exit_code(1, {"exitCode": 2}) == 2   # torchrun's ChildFailedError over a stage's exit 2
    assert stage_exit_code(1, {"exitCode": 3}) == 3
    assert stage_exit_code(1, {}) == 1 and stage_exit_code(1, None) == 1
    assert stage_exit_code(137, {"exitCode": 2}) == 137  # killed: the process's fate, not the stage's word
    assert stage_exit_code(0, {"exitCode": 2}) == 0
    assert stage_exit_code(1, {"exitCode": True}) == 1 and stage_exit_code(1, {"exitCode": "2"}) == 1


def test_invalid_input_under_torchrun_is_permanent():
    message = json.dumps({"phase": "Failed", "error": "rank 1: data: missing string field 'response'", "exitCode": 2})
    pods = [_pod("sft-0", 1, "Traceback (most recent call last): ... ChildFailedError"), _pod("sft-1", 1, message)]
    failure = classify_failure(FAILED_JOB, pods)
    assert not failure.retryable and failure.reason == "InvalidSpec" and failure.exit_code == 2
    assert "missing string field 'response'" in failure.message


def test_without_a_report_exit_1_stays_retryable():
    failure = classify_failure(FAILED_JOB, [_pod("sft-0", 1, "some log tail")])
    assert failure.retryable and failure.reason == "Error"
