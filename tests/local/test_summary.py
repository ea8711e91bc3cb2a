"""The closing lines of ``branchmerge run`` (operator/local/summary.py), printed for real local runs: one row
per selected stage, an error line for each stage that failed on its own, and what to type next."""
from __future__ import annotations

import io
import re
import signal
from datetime import datetime, timedelta, timezone

import pytest

from branchmerge.api.manifests import load
from branchmerge.operator.local.display import PlainDisplay
from branchmerge.operator.local.runner import RunOptions, Runner
from branchmerge.operator.local.summary import duration, print_summary
from branchmerge.operator.local.workdir import Workdir

from .conftest import merge, write_manifests


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")  # how the status files writes times


@pytest.fixture(scope="module")
def mixed_run(models, tmp_path_factory):
    """One run where ``fine`` succeeds, ``broken`` fails on a missing input and ``after`` is stalled by it."""
    root = tmp_path_factory.mktemp("summary")
    folder = write_manifests(root / "m", [
        merge("fine", "linear", [models["m1"], models["m2"]]),
        merge("broken", "linear", [models["m1"], root / "no-such-model"]),
        merge("after", "linear", ["broken", models["m2"]]),
    ])
    runner = Runner(load([folder]), Workdir.at(root / "wd"), RunOptions(jobs=2), PlainDisplay(io.StringIO(), 0))
    code = runner.run()
    return runner, code


def rows(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("  ")}


def test_one_row_per_stage_then_errors_for_root_causes_only(mixed_run, capsys):
    runner, code = mixed_run
    assert code == 1
    out = io.StringIO()
    print_summary(runner, out)
    text, err = out.getvalue(), capsys.readouterr().err
    assert text.startswith("\n")  # a blank line parts the summary from the progress lines
    table = rows(text)
    assert list(table) == runner.selected  # the run's order, upstreams first
    assert table["Merge/fine"][:2] == ["Succeeded", "Succeeded"]
    assert re.fullmatch(r"\d+s", table["Merge/fine"][2])  # seconds from start to completion
    assert table["Merge/broken"][:2] == ["Failed", "InvalidSpec"]
    # a stage that never started has no duration
    assert table["Merge/after"] == ["Waiting", "UpstreamFailed", "-"]
    # the failure names its log; the stalled downstream is not reported as an error of its own
    log = runner.workdir.root / "runs/merge/broken/stage.log"
    assert log.is_file()
    errors = err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: Merge/broken failed: ")
    assert "no-such-model" in errors[0] and errors[0].endswith(f"(log: {log})")
    root = runner.workdir.root
    assert text.endswith(f"status: branchmerge status --workdir {root}\n"
                         f"report: branchmerge report --workdir {root}\n")


def test_a_clean_run_prints_no_error_lines(models, tmp_path, capsys):
    folder = write_manifests(tmp_path / "m", [merge("soup", "linear", [models["m1"], models["m2"]])])
    runner = Runner(load([folder]), Workdir.at(tmp_path / "wd"), RunOptions(), PlainDisplay(io.StringIO(), 0))
    assert runner.run() == 0
    out = io.StringIO()
    print_summary(runner, out)
    assert capsys.readouterr().err == ""
    assert list(rows(out.getvalue())) == ["Merge/soup"]
    assert "report: branchmerge report" in out.getvalue()


class InterruptOnStart(PlainDisplay):
    """Ctrl-C as a user would press it: the moment the first stage starts running."""

    def transition(self, key: str, phase: str, reason: str, message: str) -> None:
        super().transition(key, phase, reason, message)
        if phase == "Running":
            signal.raise_signal(signal.SIGINT)


def test_an_interrupted_run_says_how_to_resume_instead_of_where_to_look(models, tmp_path, capsys):
    folder = write_manifests(tmp_path / "m", [merge("soup", "linear", [models["m1"], models["m2"]]),
                                              merge("fused", "linear", ["soup", models["m2"]])])
    runner = Runner(load([folder]), Workdir.at(tmp_path / "wd"), RunOptions(jobs=1), InterruptOnStart(io.StringIO(), 0))
    assert runner.run() == 130
    out = io.StringIO()
    print_summary(runner, out)
    err = capsys.readouterr().err
    assert list(rows(out.getvalue())) == ["Merge/soup", "Merge/fused"]
    assert rows(out.getvalue())["Merge/fused"][-2:] == ["Interrupted", "-"]
    # an interrupted stage is not a failure to report
    assert "error:" not in err
    assert f"interrupted; rerun the same command to resume (workdir {runner.workdir.root})" in err
    assert "status:" not in out.getvalue() and "report:" not in out.getvalue()


def test_duration_of_finished_running_and_unstarted_stages():
    start = datetime(2026, 1, 1, 12, 0, 0)
    assert duration({"phase": "Succeeded", "startTime": stamp(start),
                     "completionTime": stamp(start + timedelta(minutes=2, seconds=5))}) == 125.0
    assert duration({"phase": "Failed", "startTime": stamp(start), "completionTime": stamp(start)}) == 0.0
    # still running: measured up to now (UTC, as the times are written)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    running = duration({"phase": "Running", "startTime": stamp(now - timedelta(seconds=30))})
    assert running is not None and 29 <= running <= 60
    # a start without an end and not running (a retry waiting for its backoff): no duration
    assert duration({"phase": "Pending", "startTime": stamp(start)}) is None
    assert duration({"phase": "Waiting"}) is None
    assert duration({}) is None


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01T12:00:00Z"])
def test_a_time_the_store_would_not_write_gives_no_duration(text):
    assert duration({"phase": "Succeeded", "startTime": text, "completionTime": "2026-01-01T12:00:05Z"}) is None
