r"""Math answers: the last ``\boxed{...}`` of the response against the reference, via Math-Verify.

A cheap exact-string path (after light LaTeX normalisation) answers most cases without sympy; everything
else goes through ``math_verify.parse``/``verify`` (fractions vs decimals, equivalent expressions, sets,
intervals). Math-Verify's own timeouts use SIGALRM, which works only in the main thread: elsewhere they
are disabled.
"""
from __future__ import annotations

import re
import threading

from .text import answer_part, boxed_contents
from .verdict import Verdict

_DROP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\$|\s+|\^\{?\\circ\}?|\\displaystyle")


def normalize_latex(answer: str) -> str:
    """Whitespace/sizing-insensitive form for the fast path (never used to declare a mismatch)."""
    s = _DROP.sub("", answer)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    return s.rstrip(".")


def _parse(expr: str):
    from math_verify import parse

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return parse(f"\\boxed{{{expr}}}", parsing_timeout=timeout)


def equivalent(predicted: str, reference: str) -> bool:
    if normalize_latex(predicted) == normalize_latex(reference):
        return True
    from math_verify import verify

    gold, pred = _parse(reference), _parse(predicted)
    if not gold or not pred:
        return False
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return bool(verify(gold, pred, timeout_seconds=timeout))


def grade_math(response: str, reference: str | int | float | None) -> Verdict:
    if reference is None or str(reference).strip() == "":
        return Verdict(None, "no_reference", None)
    reference = str(reference).strip()
    ref_boxes = boxed_contents(reference)
    if ref_boxes:  # references stored as "\boxed{...}" or full solutions
        reference = ref_boxes[-1]
    boxes = boxed_contents(answer_part(response)) or boxed_contents(response)
    if not boxes:
        return Verdict(False, "no_boxed_answer", None)
    predicted = boxes[-1]
    try:
        ok = equivalent(predicted, reference)
    except Exception as err:  # a parser blow-up is a failed comparison, not a crashed stage
        return Verdict(False, f"verify_error:{type(err).__name__}", predicted)
    return Verdict(ok, "correct" if ok else "wrong_answer", predicted)
