"""Read training records (JSONL or Parquet, a file or a folder of them) and turn them into chat messages.

Every record becomes a list of ``{"role", "content"}`` messages: either the record's ``messages`` field as is,
or a user prompt and an assistant response from two configurable fields. Datasets are mixed by weight:
weight w contributes round(w x size) records per epoch (repeating whole copies, then a seeded subset), so
weight 1.0 everywhere is plain concatenation.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..datasets import iter_records
from ..errors import InvalidInput

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Layout:
    """How records of one dataset are laid out (from spec.data[i])."""

    format: str = "auto"  # auto | messages | prompt-response
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"


def to_messages(record: Any, layout: Layout, where: str) -> list[dict]:
    if not isinstance(record, dict):
        raise InvalidInput(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    use_messages = layout.format == "messages" or (layout.format == "auto" and layout.messages_field in record)
    if use_messages:
        messages = record.get(layout.messages_field)
        if not isinstance(messages, list) or not messages:
            raise InvalidInput(f"{where}: field {layout.messages_field!r} missing or not a non-empty list")
        out = []
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InvalidInput(f"{where}: {layout.messages_field}[{j}] needs a role ({'/'.join(ROLES)}) "
                                   "and a string content")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise InvalidInput(f"{where}: {layout.messages_field} has no assistant message to learn from")
        return out
    for field in (layout.prompt_field, layout.response_field):
        if not isinstance(record.get(field), str):
            hint = "" if layout.format != "auto" else f" (and no {layout.messages_field!r} field)"
            raise InvalidInput(f"{where}: missing string field {field!r}{hint}")
    return [{"role": "user", "content": record[layout.prompt_field]},
            {"role": "assistant", "content": record[layout.response_field]}]


def load_dataset(path: Path, layout: Layout, what: str) -> list[list[dict]]:
    conversations = [to_messages(rec, layout, where)
                     for where, rec in iter_records(path, what)]
    if not conversations:
        raise InvalidInput(f"{what}: dataset {path} is empty (no records)")
    return conversations


def mix(datasets: list[list[Any]], weights: list[float], seed: int) -> list[Any]:
    """Concatenate datasets, each resized to round(weight x size) (whole repeats + a seeded subset)."""
    rng = random.Random(seed)
    out: list[Any] = []
    for items, weight in zip(datasets, weights):
        want = max(1, round(weight * len(items)))
        whole, rest = divmod(want, len(items))
        out.extend(items * whole)
        out.extend(items[i] for i in sorted(rng.sample(range(len(items)), rest)))
    return out
