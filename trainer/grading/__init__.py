"""Graders shared by TeacherGen (verification) and Eval (scoring): ``grade(kind, response, record) -> Verdict``.

Record format (one JSON object per prompt; field names are configurable, these are the defaults):
- ``math``: ``record[answer_field]`` is the reference answer, plain or LaTeX (``"\\frac{1}{2}"``, ``"0.5"``,
  ``"\\boxed{3}"``). The response's last ``\\boxed{...}`` is compared with Math-Verify.
- ``mcq``: ``record[answer_field]`` is the letter (``"C"``, ``"(C)"``) or a 0-based index; optional
  ``record["choices"]`` or ``record["options"]`` (a list) limits the valid letters.
- ``code``: ``record[tests_field]`` holds the tests (see :mod:`.code` for the accepted encodings: stdin/stdout
  pairs, or a function name with argument lists and return values, LiveCodeBench's JSON encoding included);
  the function name may also come from ``record["fn_name"]`` or ``record["metadata"]["func_name"]``.
- ``exact``: ``record[answer_field]`` is a string (or a list of acceptable strings).
- ``none``: nothing is checked (verdict ``correct=None``, reason ``unverified``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .code import grade_code
from .exact import grade_exact
from .math import grade_math
from .mcq import grade_mcq
from .sandbox import Limits
from .verdict import Verdict

KINDS = ("math", "mcq", "code", "exact", "none")
DEFAULT_ANSWER_FIELD = "answer"
DEFAULT_TESTS_FIELD = "tests"

__all__ = ["KINDS", "Limits", "Verdict", "function_name", "grade", "graders_digest", "grade_code", "grade_exact", "grade_math", "grade_mcq"]


def graders_digest() -> str:
    """sha256 over this package's source files: which graders produced a verdict (results.json records it, so a
    re-scored result says whether the graders changed since)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()


def function_name(record: dict) -> str | None:
    """The function a functional code test calls: ``fn_name``, else ``metadata.func_name`` (LiveCodeBench)."""
    if record.get("fn_name"):
        return str(record["fn_name"])
    meta = record.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    if isinstance(meta, dict) and meta.get("func_name"):
        return str(meta["func_name"])
    return None


def grade(kind: str, response: str, record: dict, *, answer_field: str | None = None,
          tests_field: str | None = None, timeout_seconds: float = 10.0, memory_mb: int = 512) -> Verdict:
    """Grade one response against its record. Never raises on bad responses; raises ValueError on a bad kind."""
    if kind == "none":
        return Verdict(None, "unverified", None)
    if kind in ("math", "mcq", "exact"):
        reference: Any = record.get(answer_field or DEFAULT_ANSWER_FIELD)
        if kind == "math":
            return grade_math(response, reference)
        if kind == "mcq":
            return grade_mcq(response, reference, record.get("choices") or record.get("options"))
        return grade_exact(response, reference)
    if kind == "code":
        limits = Limits(timeout_seconds=timeout_seconds, memory_mb=memory_mb)
        return grade_code(response, record.get(tests_field or DEFAULT_TESTS_FIELD), fn_name=function_name(record),
                          limits=limits)
    raise ValueError(f"unknown verification kind {kind!r}; expected one of {', '.join(KINDS)}")
