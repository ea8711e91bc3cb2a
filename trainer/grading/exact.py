r"""Exact answers after normalisation: case, whitespace, surrounding quotes/markup and trailing punctuation.

The answer taken from the response is the last ``\boxed{}``, else the text after the last "answer:"/"answer is",
else the last non-empty line of the answer part.
"""
from __future__ import annotations

import re
import unicodedata

from .text import answer_part, last_boxed
from .verdict import Verdict


def normalize_text(text: str) -> str:
    s = unicodedata.normalize("NFKC", str(text)).strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = s.strip("$*_`\"' ").rstrip(".!;, ")
    return re.sub(r"\s+", " ", s).lower()


def extract_answer(response: str) -> str | None:
    text = answer_part(response)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    hits = list(re.finditer(r"answer\s*(?:is|:)\s*(.+)", text, flags=re.I))
    if hits:
        return hits[-1].group(1).strip()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def grade_exact(response: str, reference) -> Verdict:
    if reference is None:
        return Verdict(None, "no_reference", None)
    answer = extract_answer(response)
    if answer is None:
        return Verdict(False, "no_answer", None)
    refs = reference if isinstance(reference, (list, tuple)) else [reference]
    ok = normalize_text(answer) in {normalize_text(r) for r in refs}
    return Verdict(ok, "correct" if ok else "wrong_answer", answer)
