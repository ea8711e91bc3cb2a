"""Benchmark datasets (read by trainer/datasets.py: JSONL, JSON list, Parquet, or a folder of them).

Format per kind: docs/eval-data.md. Records keep their order; ``limit`` keeps the first N.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..datasets import read_records
from ..errors import InvalidInput


class DataError(ValueError):
    """A dataset record is malformed (message names the file and record)."""


def load_records(path: Path, limit: int | None = None, id_field: str = "id") -> list[dict[str, Any]]:
    """All records (the first ``limit``); a record without ``id_field`` gets its position as id."""
    try:
        records = read_records(Path(path), "", limit)
    except InvalidInput as err:
        raise DataError(str(err)) from None
    if not records:
        raise DataError(f"{path}: the dataset has no records")
    seen: dict[str, int] = {}
    for i, record in enumerate(records):
        qid = str(record.get(id_field, i))
        if qid in seen:
            raise DataError(f"{path}: record {i}: duplicate {id_field} {qid!r} (also record {seen[qid]})")
        seen[qid] = i
    return records


def question_id(record: dict, index: int, id_field: str = "id") -> str:
    return str(record.get(id_field, index))
