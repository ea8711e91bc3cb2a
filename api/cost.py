"""What a stage run used: ``status.cost`` and the result's ``cost``, with the helpers both control planes,
the report and the model card share.

Fields (camelCase, as in the status): ``wallSeconds``, ``cpuSeconds`` (user + system, every process of the
stage), ``peakMemoryBytes`` (largest resident set of one process), ``gpus`` (devices held), ``gpuSeconds``
(GPUs x wall: what a cluster bills whether the devices were busy or not), and in a status ``attempts`` (how
many attempts the sums cover: retries cost money too, so a run's cost is that of all its attempts).
"""
from __future__ import annotations

from typing import Any

COST_FIELDS = ("wallSeconds", "cpuSeconds", "peakMemoryBytes", "gpus", "gpuSeconds")
_SUMMED = ("wallSeconds", "cpuSeconds", "gpuSeconds")
_MAXED = ("peakMemoryBytes", "gpus")


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def clean_cost(cost: Any) -> dict | None:
    """The known, non-negative numeric fields of a cost dict (None when it has none): what a stage or a pod
    reports is input, never trusted to fit the schema."""
    if not isinstance(cost, dict):
        return None
    out: dict[str, Any] = {}
    for key in COST_FIELDS + ("attempts",):
        value = _num(cost.get(key))
        if value is None:
            continue
        out[key] = int(value) if key in ("peakMemoryBytes", "gpus", "attempts") else round(value, 3)
    return out or None


def add_costs(total: dict | None, more: dict | None) -> dict | None:
    """Two costs together: times and GPU-seconds add up, peak memory and GPU count are the larger."""
    a, b = clean_cost(total), clean_cost(more)
    if a is None or b is None:
        return a or b
    out: dict[str, Any] = {}
    for key in _SUMMED + ("attempts",):
        if key in a or key in b:
            out[key] = round(a.get(key, 0) + b.get(key, 0), 3) if key != "attempts" else a.get(key, 0) + b.get(key, 0)
    for key in _MAXED:
        if key in a or key in b:
            out[key] = max(a.get(key, 0), b.get(key, 0))
    return out


def sum_costs(costs) -> dict | None:
    total = None
    for cost in costs:
        total = add_costs(total, cost)
    return total


def format_seconds(seconds: float) -> str:
    """1.5 s, 2m05s, 3h07m, 2.4 days."""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 86400 * 2:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{seconds / 86400:.1f} days"


def format_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def gpu_hours(cost: dict | None) -> float:
    return float((clean_cost(cost) or {}).get("gpuSeconds", 0.0)) / 3600.0


def format_cost(cost: dict | None) -> str:
    """One line for humans (model card, report, CLI): wall, CPU, GPU time and peak memory."""
    c = clean_cost(cost)
    if not c:
        return "not measured"
    parts = []
    if "wallSeconds" in c:
        parts.append(f"wall {format_seconds(c['wallSeconds'])}")
    if "cpuSeconds" in c:
        parts.append(f"CPU {format_seconds(c['cpuSeconds'])}")
    if c.get("gpus"):
        parts.append(f"GPU {c.get('gpuSeconds', 0) / 3600:.2f} h ({c['gpus']} GPU{'s' if c['gpus'] != 1 else ''})")
    elif "gpuSeconds" in c:
        parts.append("no GPU")
    if c.get("peakMemoryBytes"):
        parts.append(f"peak memory {format_bytes(c['peakMemoryBytes'])}")
    if c.get("attempts", 1) > 1:
        parts.append(f"{c['attempts']} attempts")
    return ", ".join(parts)
