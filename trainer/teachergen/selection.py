"""Which samples of one prompt are kept, and why the others are not.

Samples the engine rejected come first (``engine:<code>``: ``engine:http_400``, ``engine:prompt_too_long``),
then cheap filters (truncated, too long, no closed think block), then verification (only where the mode
needs it or the verdict is stored), then dedup and the per-prompt caps. Every sample gets either
``kept`` or exactly one rejection reason; reasons are stable strings counted in the manifest.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ...api.teachergen import Filters, Select
from ..engine import Completion
from ..grading import Verdict


@dataclass
class Decision:
    index: int
    completion: Completion
    verdict: Verdict | None = None
    rejected: str | None = None  # None means kept


def normalize_response(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def has_closed_think(text: str) -> bool:
    """A ``</think>`` with reasoning before it (the opening tag may sit in the chat template's prompt)."""
    close = text.find("</think>")
    if close < 0:
        return False
    opening = text.find("<think>")
    if opening > close:
        return False
    body = text[opening + len("<think>"):close] if opening >= 0 else text[:close]
    return bool(body.strip())


def decide(completions: list[Completion], *, select: Select, filters: Filters, verify_kind: str,
           verify: Callable[[str], Verdict]) -> list[Decision]:
    decisions = [Decision(i, c) for i, c in enumerate(completions)]
    for d in decisions:
        c = d.completion
        if c.rejected:  # the engine gave no text (the server refused the request, the prompt did not fit)
            d.rejected = f"engine:{c.rejected}"
        elif c.truncated:
            d.rejected = "truncated"
        elif filters.max_response_tokens is not None and c.num_tokens > filters.max_response_tokens:
            d.rejected = "too_long"
        elif filters.require_think and not has_closed_think(c.text):
            d.rejected = "no_think"
    needs_correct = select.mode != "all"
    seen: set[str] = set()
    kept = 0
    cap = 1 if select.mode == "first-correct" else select.max_per_prompt
    for d in decisions:
        if d.rejected:
            continue
        if cap is not None and kept >= cap:
            d.rejected = "not_first" if select.mode == "first-correct" else "max_per_prompt"
            continue
        key = normalize_response(d.completion.text) if filters.dedup else None
        if key is not None and key in seen:
            d.rejected = "duplicate"
            continue
        if verify_kind != "none":
            d.verdict = verify(d.completion.text)
            if needs_correct and d.verdict.correct is not True:
                d.rejected = f"verify:{d.verdict.reason}"
                continue
        if key is not None:
            seen.add(key)
        kept += 1
    return decisions
