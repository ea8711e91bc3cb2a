"""Dataset records, read the same way by every stage (TeacherGen prompts, BranchSFT data, Eval benchmarks).

A dataset is a .jsonl, .json (a list of objects) or .parquet file, or a folder of .jsonl/.parquet files read
recursively in path order. In a folder, names starting with "_" or "." are metadata, not records (a published
folder's _manifest.json), and .json files are left out (a TeacherGen output's teachergen.json is its manifest).
Every error is InvalidInput (exit 2) and starts with ``what``, the spec field the dataset came from (if given).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .errors import InvalidInput

SUFFIXES = (".jsonl", ".json", ".parquet")
FOLDER_SUFFIXES = (".jsonl", ".parquet")


def _invalid(what: str, message: str) -> InvalidInput:
    return InvalidInput(f"{what}: {message}" if what else message)


def dataset_files(path: Path, what: str) -> list[Path]:
    path = Path(path)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise _invalid(what, f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FOLDER_SUFFIXES
                   and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise _invalid(what, f"no .jsonl or .parquet files in {path}")
    return files


def _file_records(file: Path, what: str) -> Iterator[tuple[str, object]]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(file).to_pylist()
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise _invalid(what, f"{file}: cannot read Parquet ({err})") from None
        yield from ((f"{file}[{i}]", row) for i, row in enumerate(rows))
    elif file.suffix == ".json":
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as err:
            raise _invalid(what, f"{file}: invalid JSON ({err})") from None
        if not isinstance(data, list):
            raise _invalid(what, f"{file}: a .json dataset must be a list of objects")
        yield from ((f"{file}[{i}]", row) for i, row in enumerate(data))
    else:
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{file}:{lineno}", json.loads(line)
                    except ValueError as err:
                        raise _invalid(what, f"{file}:{lineno}: invalid JSON ({err})") from None


def iter_records(path: Path, what: str) -> Iterator[tuple[str, dict]]:
    """(location, record) for every record; location is file:line or file[row], for error messages."""
    for file in dataset_files(path, what):
        for where, record in _file_records(file, what):
            if not isinstance(record, dict):
                raise _invalid(what, f"{where}: a record must be a JSON object")
            yield where, record


def read_records(path: Path, what: str, limit: int | None = None) -> list[dict]:
    records = []
    for _, record in iter_records(path, what):
        if limit is not None and len(records) >= limit:
            break
        records.append(record)
    return records
