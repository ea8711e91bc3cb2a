"""Failure classes of a stage, mapped to exit codes the control planes act on."""

EXIT_OK = 0
EXIT_INVALID = 2  # bad spec or inputs: permanent, never retried
EXIT_RETRYABLE = 3  # transient: retried with backoff up to runPolicy.backoffLimit


class StageError(Exception):
    exit_code = EXIT_RETRYABLE


class InvalidInput(StageError):
    """The spec or an input is wrong; running again cannot help."""

    exit_code = EXIT_INVALID


class Retryable(StageError):
    """A transient failure (endpoint down, preempted, out of space); a retry may succeed."""

    exit_code = EXIT_RETRYABLE


def stage_exit_code(process_code: int, report: dict | None) -> int:
    """The stage's own exit class: the ``exitCode`` its result (file or termination message) reports, else
    the process's. A launcher can hide it (torchrun exits 1 whatever its ranks exited with), the stage's
    report cannot; a signal (>= 128) is the process's fate and wins over any report."""
    reported = (report or {}).get("exitCode")
    if process_code >= 128 or not isinstance(reported, int) or isinstance(reported, bool) or process_code == 0:
        return process_code
    return reported
