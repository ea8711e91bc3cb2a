"""The closing lines of ``branchmerge run``: one row per stage, then the failures with their log paths."""
from __future__ import annotations

import sys
from datetime import datetime, timezone

from .display import fmt_duration, reason_of


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None


def duration(status: dict) -> float | None:
    """Run time: start to completion, or start to now while the stage is running."""
    start, end = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    if start and not end and status.get("phase") == "Running":
        end = datetime.now(timezone.utc).replace(tzinfo=None)
    return (end - start).total_seconds() if start and end else None


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


def run_and_summarise(manifests, workdir, options, display) -> int:
    """Run a loaded manifest set with the local Runner and print the closing summary: the one entry both
    `branchmerge run` and `branchmerge quickstart` use. Bad manifests or a bad selection exit 2."""
    from .runner import Runner, SelectionError

    for problem in manifests.problems:
        print(f"error: {problem}", file=sys.stderr)
    if not manifests.ok:
        return 2
    runner = Runner(manifests, workdir, options, display)
    try:
        code = runner.run()
    except SelectionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(runner)
    return code
