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
