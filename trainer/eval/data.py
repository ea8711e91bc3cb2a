"""Benchmark datasets: JSONL, JSON (a list) or Parquet files, or a folder of them (read in name order).

Format per kind: docs/eval-data.md. Records keep their order; ``limit`` keeps the first N.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A dataset cannot be read or a record is malformed (message names the file and line)."""


def dataset_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES
                       and not p.name.startswith(("_", ".")))
        if not files:
            raise DataError(f"{path}: no {'/'.join(SUFFIXES)} files in the folder")
        return files
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported dataset file (expected {', '.join(SUFFIXES)})")
    return [path]


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON ({err})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: a record must be a JSON object")
            records.append(record)
    return records


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: a .json dataset must be a list of objects")
    return data


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet ({err})") from None


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def load_records(path: Path, limit: int | None = None, id_field: str = "id") -> list[dict[str, Any]]:
    """All records (the first ``limit``); a record without ``id_field`` gets its position as id."""
    records: list[dict] = []
    for file in dataset_files(Path(path)):
        records.extend(READERS[file.suffix](file))
        if limit is not None and len(records) >= limit:
            break
    records = records[:limit] if limit is not None else records
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
