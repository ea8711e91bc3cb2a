"""The result of grading one response."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    correct: bool | None
    """True/False, or None when the record cannot be graded (no reference, kind none)."""
    reason: str
    """Short stable reason: correct, wrong_answer, no_answer, timeout, runtime_error, ..."""
    extracted: str | None = None
    """What was taken from the response (the boxed answer, the letter, the program)."""
