"""The local runner end to end with the real Merge stage on small model folders: DAG order and
parallelism, caching, reruns after an upstream change, selection, failure propagation, status output."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from branchmerge.api.manifests import load
from branchmerge.operator.local.display import PlainDisplay
from branchmerge.operator.local.runner import RunOptions, Runner, SelectionError
from branchmerge.operator.local.status_files import StatusFiles
from branchmerge.operator.local.workdir import Workdir

from .conftest import diamond, merge, write_manifests


def run(folder: Path, workdir: Path, **options) -> tuple[int, Runner, str]:
    out = io.StringIO()
    runner = Runner(load([folder]), Workdir.at(workdir), RunOptions(**options), PlainDisplay(out, interval=0))
    code = runner.run()
    return code, runner, out.getvalue()


def status(workdir: Path, key: str) -> dict:
    return StatusFiles(Workdir.at(workdir)).load(key)["status"]


def result(workdir: Path, key: str) -> dict:
    return json.loads(Workdir.at(workdir).result_file(key).read_text())


def reason(st: dict) -> str:
    return next(c["reason"] for c in st["conditions"] if c["type"] == "Ready")


@pytest.fixture(scope="module")
def diamond_run(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("diamond")
    folder = write_manifests(root / "manifests", diamond(models))
    code, runner, log = run(folder, root / "wd", jobs=2)
    return root, folder, code, log


def test_dag_runs_upstreams_first_and_independent_stages_in_parallel(diamond_run):
    root, _, code, log = diamond_run
    wd = root / "wd"
    assert code == 0, log
    soup, ta, fused = (result(wd, f"Merge/{n}") for n in ("soup", "ta", "fused"))
    assert all(r["phase"] == "Succeeded" for r in (soup, ta, fused))
    # --jobs 2: the two independent merges overlap in time; the fused merge starts after both ended
    assert soup["startedAt"] < ta["finishedAt"] and ta["startedAt"] < soup["finishedAt"]
    assert fused["startedAt"] > max(soup["finishedAt"], ta["finishedAt"])
    # it read its inputs from the upstreams' default outputs under the workdir
    resolved = (wd / "runs/merge/fused/resolved.yaml").read_text()
    assert f"file://{wd}/outputs/merge/soup" in resolved and "from:" not in resolved
    st = status(wd, "Merge/fused")
    assert st["phase"] == "Succeeded" and st["attempts"] == 1 and st["output"]["digest"].startswith("sha256:")
    assert st["metrics"]["method"] == "arcee_fusion" and st["progress"]["fraction"] == 1.0
    assert {c["type"]: c["status"] for c in st["conditions"]} == {"Ready": "True", "Reconciling": "False",
                                                                  "Stalled": "False"}
    assert st["startTime"] <= st["completionTime"]


@pytest.mark.slow  # ~40 s on 2 busy cores: several real stage processes
def test_jobs_1_runs_one_stage_at_a_time(models, tmp_path):
    folder = write_manifests(tmp_path / "m", diamond(models)[:2])
    code, _, log = run(folder, tmp_path / "wd", jobs=1)
    assert code == 0, log
    soup, ta = result(tmp_path / "wd", "Merge/soup"), result(tmp_path / "wd", "Merge/ta")
    assert soup["finishedAt"] < ta["startedAt"] or ta["finishedAt"] < soup["startedAt"]
    assert "queued" in log


def test_status_table_and_yaml(diamond_run):
    root = diamond_run[0]
    cli = [sys.executable, "-m", "branchmerge.cli", "status", "--workdir", str(root / "wd")]
    table = subprocess.run(cli, capture_output=True, text=True, check=True).stdout.splitlines()
    assert table[0].split()[:4] == ["MERGES", "PHASE", "REASON", "METHOD"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["fused"][1:4] == ["Succeeded", "Succeeded", "arcee_fusion"] and rows["soup"][3] == "linear"
    one = subprocess.run(cli + ["Merge/fused", "-o", "yaml"], capture_output=True, text=True, check=True).stdout
    import yaml

    doc = yaml.safe_load(one)
    assert doc["kind"] == "Merge" and doc["metadata"]["name"] == "fused"
    assert doc["status"]["phase"] == "Succeeded" and doc["spec"]["method"] == "arcee_fusion"
    missing = subprocess.run(cli + ["nope"], capture_output=True, text=True)
    assert missing.returncode == 1 and "nope: not found" in missing.stderr


@pytest.mark.slow  # ~40 s on 2 busy cores: several real stage processes
def test_rerun_is_cached_then_an_upstream_change_reruns_downstream(diamond_run, models):
    root, folder, _, _ = diamond_run
    wd = root / "wd"
    before = {n: status(wd, f"Merge/{n}") for n in ("soup", "ta", "fused")}
    code, runner, log = run(folder, wd, jobs=2)
    assert code == 0 and not runner.running
    for n in ("soup", "ta", "fused"):
        st = status(wd, f"Merge/{n}")
        assert reason(st) == "Cached" and st["output"] == before[n]["output"] and st["attempts"] == 1
    assert "Running" not in log

    write_manifests(folder, diamond(models, soup_weight=3.0))  # change soup's spec only
    code, _, log = run(folder, wd, jobs=2)
    assert code == 0, log
    soup, ta, fused = (status(wd, f"Merge/{n}") for n in ("soup", "ta", "fused"))
    assert reason(soup) == "Succeeded" and soup["output"]["digest"] != before["soup"]["output"]["digest"]
    assert reason(ta) == "Cached"
    assert reason(fused) == "Succeeded" and fused["attempts"] == 2  # its input changed: rerun, not cached
    assert fused["output"]["digest"] != before["fused"]["output"]["digest"]


@pytest.mark.slow  # ~40 s on 2 busy cores: several real stage processes
def test_selection_only_and_from(diamond_run, tmp_path):
    root, folder, _, _ = diamond_run
    wd = root / "wd"
    code, runner, _ = run(folder, wd, only=["fused"])
    assert code == 0 and runner.selected == ["Merge/fused"] and reason(status(wd, "Merge/fused")) == "Succeeded"
    code, runner, _ = run(folder, wd, from_="ta")
    assert runner.selected == ["Merge/ta", "Merge/fused"]
    assert reason(status(wd, "Merge/ta")) == "Succeeded"  # forced
    with pytest.raises(SelectionError, match="Merge/fused needs Merge/soup"):
        run(folder, tmp_path / "fresh", only=["fused"])
    with pytest.raises(SelectionError, match="no such stage"):
        run(folder, wd, only=["missing"])


def test_failure_marks_downstream_upstream_failed_and_exits_nonzero(models, tmp_path):
    ghost = tmp_path / "no-such-model"
    folder = write_manifests(tmp_path / "m", [
        merge("broken", "linear", [models["m1"], ghost]),
        merge("after", "arcee_fusion", ["broken", models["m2"]], base="broken"),
        merge("later", "linear", ["after", models["m2"]]),
        merge("fine", "linear", [models["m1"], models["m2"]]),
    ])
    wd = tmp_path / "wd"
    proc = subprocess.run([sys.executable, "-m", "branchmerge.cli", "run", "-f", str(folder), "--workdir", str(wd),
                           "--plain"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    broken, after, later, fine = (status(wd, f"Merge/{n}") for n in ("broken", "after", "later", "fine"))
    assert broken["phase"] == "Failed" and reason(broken) == "InvalidSpec" and str(ghost) in \
        next(c["message"] for c in broken["conditions"] if c["type"] == "Ready")
    assert broken["attempts"] == 1  # exit 2 (invalid input) is permanent: no retry
    # as on Kubernetes (operator/policy.py): a failed upstream stalls its downstreams, all the way down;
    # they are not failed themselves and start once it is fixed
    for stuck in (after, later):
        assert stuck["phase"] == "Waiting" and reason(stuck) == "UpstreamFailed" and "attempts" in stuck
        assert stuck["attempts"] == 0 and not stuck.get("startTime")
        conditions = {c["type"]: c for c in stuck["conditions"]}
        assert conditions["Stalled"]["status"] == "True" and conditions["Stalled"]["reason"] == "UpstreamFailed"
        assert conditions["Reconciling"]["status"] == "False"
    assert fine["phase"] == "Succeeded"  # independent work still finishes
    log = wd / "runs/merge/broken/stage.log"
    assert f"error: Merge/broken failed: " in proc.stderr and f"(log: {log})" in proc.stderr
    assert "Merge/after" not in proc.stderr  # only the root cause is reported as an error line


def test_report_on_a_finished_workdir(diamond_run, tmp_path):
    root = diamond_run[0]
    out = tmp_path / "r.html"
    proc = subprocess.run([sys.executable, "-m", "branchmerge.cli", "report", "--workdir", str(root / "wd"),
                           "-o", str(out)], capture_output=True, text=True, check=True)
    assert f"report: {out}" in proc.stdout
    html = out.read_text()
    assert html.startswith("<!doctype html>") and "<h2>Pipeline</h2>" in html and "<h2>Merges</h2>" in html
    assert html.count('src="data:image/png;base64,') == 2  # pipeline graph + timings (no evals, no training here)
    assert "arcee_fusion" in html and "fractionTaken" in html and "http" not in html.split("<body>")[1]
