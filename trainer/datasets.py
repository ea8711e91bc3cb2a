"""Dataset records, read the same way by every stage (TeacherGen prompts, BranchSFT data, Eval benchmarks).

A dataset is a .jsonl, .json (a list of objects) or .parquet file, or a folder of .jsonl/.parquet files read
recursively in path order. In a folder, names starting with "_" or "." are metadata, not records (a published
folder's _manifest.json), and .json files are left out (a TeacherGen output's teachergen.json is its manifest).
Every error is InvalidInput (exit 2) and starts with ``what``, the spec field the dataset came from (if given).

Column selection: a reader that knows its fields passes ``columns``, either the names it wants or a function
that picks them from a Parquet file's column names (a layout check). Parquet then reads those columns only, in
batches, so a published file's large extra columns (OpenR1-Math's ``generations``: several full traces per row)
are never decoded. JSON text cannot be read in part: its records keep every field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

from .errors import InvalidInput

SUFFIXES = (".jsonl", ".json", ".parquet")
FOLDER_SUFFIXES = (".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: bounded memory, and ``limit`` stops early

# the names to read, or a function choosing them from the file's column names (raises ValueError with the
# reason when none of its layouts fits)
Columns = Union[Iterable[str], Callable[[list[str]], list[str]], None]


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


def parquet_columns(file: Path, columns: Columns, what: str) -> list[str] | None:
    """The columns of ``file`` to read (None: all), chosen from its schema before any row is read."""
    import pyarrow.parquet as pq

    if columns is None:
        return None
    try:
        names = pq.read_schema(file).names
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise _invalid(what, f"{file}: cannot read Parquet ({err})") from None
    if callable(columns):
        try:
            return columns(names)
        except ValueError as err:
            raise _invalid(what, f"{file}: {err} (columns: {', '.join(names)})") from None
    wanted = [columns] if isinstance(columns, str) else list(dict.fromkeys(columns))
    present = [name for name in wanted if name in names]
    # a missing field is reported by the reader that needs it; with none present it sees every column, so
    # its message can list what the file has
    return present or None


def _parquet_rows(file: Path, columns: Columns, what: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    chosen = parquet_columns(file, columns, what)
    try:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=chosen):
            yield from batch.to_pylist()
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise _invalid(what, f"{file}: cannot read Parquet ({err})") from None


def _file_records(file: Path, what: str, columns: Columns = None) -> Iterator[tuple[str, object]]:
    if file.suffix == ".parquet":
        yield from ((f"{file}[{i}]", row) for i, row in enumerate(_parquet_rows(file, columns, what)))
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


def iter_records(path: Path, what: str, columns: Columns = None) -> Iterator[tuple[str, dict]]:
    """(location, record) for every record; location is file:line or file[row], for error messages.

    ``columns``: what to read from Parquet files (module docstring); None reads every column.
    """
    for file in dataset_files(path, what):
        for where, record in _file_records(file, what, columns):
            if not isinstance(record, dict):
                raise _invalid(what, f"{where}: a record must be a JSON object")
            yield where, record


def read_records(path: Path, what: str, limit: int | None = None, columns: Columns = None) -> list[dict]:
    records = []
    for _, record in iter_records(path, what, columns):
        if limit is not None and len(records) >= limit:
            break
        records.append(record)
    return records
