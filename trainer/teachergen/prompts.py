"""Prompt records: load JSONL/Parquet, give every record a stable id, render the user message template."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..datasets import read_records
from ..errors import InvalidInput

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*\}\}")


def load_records(path: Path) -> list[dict]:
    return read_records(path, "prompts.dataset")


def derived_id(record: dict) -> str:
    """A stable id from the record's content (same record, same id, on any machine)."""
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode()
    return "p-" + hashlib.sha256(blob).hexdigest()[:16]


def assign_ids(records: list[dict], id_field: str | None) -> list[tuple[str, dict]]:
    """(id, record) sorted by id. Explicit ids must be unique; identical records without ids collapse to one."""
    seen: dict[str, dict] = {}
    for i, record in enumerate(records):
        if id_field:
            if record.get(id_field) in (None, ""):
                raise InvalidInput(f"prompts.idField: record {i} has no field {id_field!r}")
            pid = str(record[id_field])
            if pid in seen:
                raise InvalidInput(f"prompts.idField: duplicate id {pid!r}")
        else:
            pid = derived_id(record)
        seen.setdefault(pid, record)
    return sorted(seen.items())


def template_fields(template: str) -> list[str]:
    return _PLACEHOLDER.findall(template)


def render(template: str, record: dict, pid: str = "") -> str:
    r"""Replace ``{{field}}`` with the record's value; single braces (``\boxed{}``) stay literal."""
    def value(m: re.Match) -> str:
        name = m.group(1)
        if name not in record or record[name] is None:
            raise InvalidInput(f"template: record {pid or '?'} has no field {name!r}")
        v = record[name]
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)

    return _PLACEHOLDER.sub(value, template)
