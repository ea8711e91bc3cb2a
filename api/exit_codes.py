"""Exit codes of a stage: the failure class both control planes act on (retry or give up).

A stage process exits with one of these and writes it as ``exitCode`` in its result; the local runner and
the operator read it back (operator/policy.py) to decide between a retry with backoff and a permanent failure.
"""

EXIT_OK = 0
EXIT_INVALID = 2  # bad spec or inputs: permanent, never retried
EXIT_RETRYABLE = 3  # transient: retried with backoff up to runPolicy.backoffLimit


def stage_exit_code(process_code: int, report: dict | None) -> int:
    """The stage's own exit class: the ``exitCode`` its result (file or termination message) reports, else
    the process's. A launcher can hide it (torchrun exits 1 whatever its ranks exited with), the stage's
    report cannot; a signal (>= 128) is the process's fate and wins over any report."""
    reported = (report or {}).get("exitCode")
    if process_code >= 128 or not isinstance(reported, int) or isinstance(reported, bool) or process_code == 0:
        return process_code
    return reported
