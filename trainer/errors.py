"""Failure classes of a stage: exceptions that carry the exit code (api/exit_codes.py) the control planes act on."""

from ..api.exit_codes import EXIT_INVALID, EXIT_RETRYABLE


class StageError(Exception):
    exit_code = EXIT_RETRYABLE


class InvalidInput(StageError):
    """The spec or an input is wrong; running again cannot help."""

    exit_code = EXIT_INVALID


class Retryable(StageError):
    """A transient failure (endpoint down, preempted, out of space); a retry may succeed."""

    exit_code = EXIT_RETRYABLE
