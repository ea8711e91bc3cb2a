"""`kubectl get`-style views of the local status files (pure: records in, text out)."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import yaml

from ...api.resources import KIND_INFO
from ...api.timefmt import parse_time
from .display import fmt_duration, reason_of
from .summary import duration

KIND_ORDER = list(KIND_INFO)


def jsonpath(record: dict, path: str):
    value = record
    for part in path.strip(".").split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _cell(value) -> str:
    if value is None:
        return "<none>"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _age(record: dict, now: datetime) -> str:
    start = parse_time(record.get("status", {}).get("startTime"))
    if start is None:
        return "-"
    return fmt_duration(now.timestamp() - start)


def cost_cell(status: dict) -> str:
    """GPU-hours when the stage held GPUs, else CPU-seconds (status.cost, all attempts)."""
    cost = status.get("cost") or {}
    if cost.get("gpuSeconds"):
        return f"{cost['gpuSeconds'] / 3600:.2f} GPU-h"
    if isinstance(cost.get("cpuSeconds"), (int, float)):
        return f"{cost['cpuSeconds']:.1f} CPU-s"
    return "-"


def get_table(records: list[dict], now: datetime | None = None) -> str:
    """One table per kind, in pipeline order: NAME PHASE REASON <kind column> PROGRESS DURATION [COST] AGE
    (COST once a stage of the kind has a measured cost)."""
    now = now or datetime.now(timezone.utc)
    blocks = []
    for kind in KIND_ORDER:
        rows = sorted((r for r in records if r.get("kind") == kind), key=lambda r: r["metadata"]["name"])
        if not rows:
            continue
        column_name, _, path = KIND_INFO[kind].column
        costs = any((r.get("status") or {}).get("cost") for r in rows)
        header = [f"{KIND_INFO[kind].plural.upper()}", "PHASE", "REASON", column_name.upper(), "PROGRESS",
                  "DURATION"] + (["COST"] if costs else []) + ["AGE"]
        lines = [header]
        for r in rows:
            status = r.get("status", {})
            fraction = (status.get("progress") or {}).get("fraction")
            lines.append([
                r["metadata"]["name"], status.get("phase", "Pending"), reason_of(r) or "-",
                _cell(jsonpath(r, path)),
                f"{fraction * 100:.0f}%" if isinstance(fraction, (int, float)) else "-",
                fmt_duration(duration(status)), *([cost_cell(status)] if costs else []), _age(r, now),
            ])
        widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
        blocks.append("\n".join("   ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines))
    return "\n\n".join(blocks)


def find(records: list[dict], name: str) -> list[dict]:
    """Records matching Kind/name, kind/name (any case, plural or short name) or a bare name."""
    if "/" in name:
        kind_text, _, bare = name.partition("/")
        kinds = {k for k, info in KIND_INFO.items()
                 if kind_text.lower() in (k.lower(), info.plural, *info.short_names)}
        return [r for r in records if r.get("kind") in kinds and r["metadata"]["name"] == bare]
    return [r for r in records if r["metadata"]["name"] == name]


def render(record: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(record, indent=2)
    return yaml.safe_dump(record, sort_keys=False)
