"""The closing lines of ``branchmerge run``: one row per stage, then the failures with their log paths."""
from __future__ import annotations

import sys
import time

from ...api.timefmt import parse_time
from .display import fmt_duration, reason_of


def duration(status: dict) -> float | None:
    """Run time: start to completion, or start to now while the stage is running."""
    start, end = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    if start is not None and end is None and status.get("phase") == "Running":
        end = time.time()
    return end - start if start is not None and end is not None else None


def print_summary(runner, stream=None) -> None:
    stream = stream or sys.stdout
    print("", file=stream)
    for key in runner.selected:
        status = runner.records[key]["status"]
        print(f"  {key:<30} {status.get('phase', ''):<10} {reason_of(runner.records[key]):<16} "
              f"{fmt_duration(duration(status)):>7}", file=stream)
    for key, error, log in runner.failures():
        print(f"error: {key} failed: {error}" + (f" (log: {log})" if log else ""), file=sys.stderr)
    if runner.interrupted:
        print(f"interrupted; rerun the same command to resume (workdir {runner.workdir.root})", file=sys.stderr)
    else:
        print(f"status: branchmerge status --workdir {runner.workdir.root}\n"
              f"report: branchmerge report --workdir {runner.workdir.root}", file=stream)

