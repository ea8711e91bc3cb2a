"""Prompt building: ``{{field}}`` templates, lettered multiple-choice options, seeded option shuffling.

Only ``{{name}}`` is a placeholder; single braces stay literal (``\\boxed{}`` in a template is text).
"""
from __future__ import annotations

import hashlib
import random
import re
import string
from typing import Any, Mapping, Sequence

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")
LETTERS = string.ascii_uppercase


class TemplateError(ValueError):
    """A template names a field the record does not have."""


def placeholders(template: str) -> list[str]:
    return PLACEHOLDER.findall(template)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "\n".join(_as_text(v) for v in value)
    return str(value)


def render(template: str, values: Mapping[str, Any]) -> str:
    """Replace each ``{{name}}`` with ``values[name]``; a missing name raises TemplateError naming it."""

    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in values or values[name] is None:
            raise TemplateError(f"template field {{{{{name}}}}} is not in the record")
        return _as_text(values[name])

    return PLACEHOLDER.sub(substitute, template)


def lettered(choices: Sequence[str]) -> str:
    """``A. first`` / ``B. second`` ... one per line."""
    return "\n".join(f"{LETTERS[i]}. {_as_text(choice).strip()}" for i, choice in enumerate(choices))


def reference_index(answer: Any, choices: Sequence[str]) -> int:
    """Index of the correct option from a letter (``"C"``, ``"(C)"``), a 0-based int, or the option's text."""
    if isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is not a letter, an index or an option")
    if isinstance(answer, int):
        if 0 <= answer < len(choices):
            return answer
        raise ValueError(f"answer index {answer} outside 0..{len(choices) - 1}")
    text = str(answer).strip()
    letter = text.strip("()[]. ").upper()
    if len(letter) == 1 and letter in LETTERS[: len(choices)]:
        return LETTERS.index(letter)
    matches = [i for i, choice in enumerate(choices) if _as_text(choice).strip() == text]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"answer {answer!r} is neither a letter A-{LETTERS[len(choices) - 1]} nor one of the options")


def seeded_rng(*parts: Any) -> random.Random:
    """A generator seeded from the parts' text (stable across processes, unlike ``hash()``)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def shuffled_order(num_choices: int, *seed_parts: Any) -> list[int]:
    """A permutation: position i of the shown options holds original option ``order[i]``."""
    order = list(range(num_choices))
    seeded_rng(*seed_parts).shuffle(order)
    return order


def mcq_view(choices: Sequence[str], correct: int, order: Sequence[int] | None = None) -> tuple[str, str, list[int]]:
    """(lettered options, reference letter, order) for the options shown in ``order`` (identity if None)."""
    order = list(order) if order is not None else list(range(len(choices)))
    shown = [choices[i] for i in order]
    return lettered(shown), LETTERS[order.index(correct)], order
