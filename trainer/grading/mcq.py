r"""Multiple-choice answers: find the letter the response commits to, compare with the reference letter.

Tried in order on the answer part (after ``</think>``), then on the whole response; the LAST match of the
first pattern that matches wins:
1. ``\boxed{C}``, ``\boxed{(C)}``, ``\boxed{\text{C}}``, ``\boxed{C. text}``;
2. "answer is (C)", "Answer: C", "final answer: **C**", "correct option is C", "choose C";
3. a line that is only the letter: "(C)", "C.", "**C**", "C) text";
4. the last standalone valid letter in parentheses, then bare (bare "A"/"I" only at the very end: they are words).
Valid letters are A..J, or as many as the record's choices/options.
"""
from __future__ import annotations

import re
from typing import Sequence

from .text import answer_part, boxed_contents
from .verdict import Verdict

LETTERS = "ABCDEFGHIJ"


def _letter_pattern(valid: str) -> str:
    return f"[{valid}{valid.lower()}]"


def _from_boxes(text: str, valid: str) -> str | None:
    for box in reversed(boxed_contents(text)):
        inner = re.sub(r"\\text(bf)?\{([^{}]*)\}", r"\2", box).strip().strip("()[]*. ")
        m = re.fullmatch(rf"([{valid}])(?:[.):]\s*.*|\s+.*)?", inner, flags=re.S)
        if m:
            return m.group(1)
    return None


def _from_phrases(text: str, valid: str) -> str | None:
    lp = _letter_pattern(valid)
    pattern = (r"\b(?:answer|option|choice)\b\s*(?:is|:|=)?\s*(?:\w+\s+){0,2}?(?:is|:)?\s*"
               r"[\*\s]*[\(\[]?\s*(" + lp + r")\s*[\)\]]?(?![A-Za-z])"
               r"|(?:choose|select|pick)\s+(?:option\s+)?[\(\[]?(" + lp + r")[\)\]]?(?![A-Za-z])")
    hits = list(re.finditer(pattern, text, flags=re.I))
    for m in reversed(hits):
        letter = (m.group(1) or m.group(2)).upper()
        if letter in valid:
            return letter
    return None


def _from_lines(text: str, valid: str) -> str | None:
    for line in reversed(text.strip().splitlines()):
        m = re.fullmatch(rf"\s*[\*_]*[\(\[]?([{valid}])[\)\]]?[\*_]*(?:[.:)]\s.*|[.:)]?)\s*", line)
        if m:
            return m.group(1)
    return None


def _from_standalone(text: str, valid: str) -> str | None:
    paren = re.findall(rf"\(([{valid}])\)", text)
    if paren:
        return paren[-1]
    bare = [m for m in re.finditer(rf"(?<![A-Za-z0-9_\\])([{valid}])(?![A-Za-z0-9_'])", text)]
    for m in reversed(bare):
        letter = m.group(1)
        if letter in "AI" and text[m.end():].strip(" .*)\n"):
            continue  # "A"/"I" mid-text are usually words
        return letter
    return None


def extract_letter(response: str, n_choices: int | None = None) -> str | None:
    valid = LETTERS[: n_choices] if n_choices and 2 <= n_choices <= len(LETTERS) else LETTERS
    for text in (answer_part(response), response):
        for finder in (_from_boxes, _from_phrases, _from_lines):
            letter = finder(text, valid)
            if letter:
                return letter
    return _from_standalone(answer_part(response), valid)


def reference_letter(reference) -> str | None:
    if isinstance(reference, int) and 0 <= reference < len(LETTERS):
        return LETTERS[reference]  # an index into the choices
    m = re.fullmatch(r"\s*[\(\[]?([A-Ja-j])[\)\].]?\s*", str(reference))
    return m.group(1).upper() if m else None


def grade_mcq(response: str, reference, choices: Sequence | None = None) -> Verdict:
    ref = reference_letter(reference) if reference is not None else None
    if ref is None:
        return Verdict(None, "no_reference", None)
    letter = extract_letter(response, len(choices) if choices else None)
    if letter is None:
        return Verdict(False, "no_answer", None)
    return Verdict(letter == ref, "correct" if letter == ref else "wrong_answer", letter)
