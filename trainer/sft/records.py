"""Read training records (JSONL or Parquet, a file or a folder of them) and turn them into chat messages.

Every record becomes a list of ``{"role", "content"}`` messages: either the record's ``messages`` field as is,
or a user prompt and an assistant response from two configurable fields. Datasets are mixed by weight:
weight w contributes round(w x size) records per epoch (repeating whole copies, then a seeded subset), so
weight 1.0 everywhere is plain concatenation.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import InvalidInput

SUFFIXES = (".jsonl", ".json", ".parquet")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Layout:
    """How records of one dataset are laid out (from spec.data[i])."""

    format: str = "auto"  # auto | messages | prompt-response
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"


def dataset_files(path: Path, what: str) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        # a folder holds data files (.jsonl/.parquet) beside metadata: a published folder's _manifest.json,
        # a TeacherGen's teachergen.json -- those are not records
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".parquet")
                       and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise InvalidInput(f"{what}: no .jsonl or .parquet files in {path}")
    for f in files:
        if f.suffix not in SUFFIXES:
            raise InvalidInput(f"{what}: {f.name}: unsupported file type (expected .jsonl or .parquet)")
    return files


def iter_raw(file: Path, what: str) -> Iterator[tuple[str, Any]]:
    """(location, record) for every record of one file."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except Exception as err:  # corrupt file: permanent
            raise InvalidInput(f"{what}: {file}: cannot read parquet: {err}") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{file}[{i}]", row
        return
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{file}:{lineno}", json.loads(line)
            except ValueError as err:
                raise InvalidInput(f"{what}: {file}:{lineno}: invalid JSON ({err})") from None


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
                     for file in dataset_files(path, what) for where, rec in iter_raw(file, what)]
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
