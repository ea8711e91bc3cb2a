"""The report's cost section: per-stage table and the TinyR1 Table 2 comparison of the branch + merge
route with the mixed-data retraining, on a workdir written the way the runner leaves one."""
from __future__ import annotations

import json
import re
from pathlib import Path

from branchmerge.api.cost import format_cost
from branchmerge.report import build_html, gather
from branchmerge.operator.local.status_files import StatusFiles
from branchmerge.operator.local.workdir import Workdir
from branchmerge.api.labels import LABEL_SEARCH

from tests.conftest import manifest

H = 3600.0


def _ref(kind: str, name: str) -> dict:
    return {"from": {"kind": kind, "name": name}}


def _record(kind: str, name: str, spec: dict, gpu_hours: float | None, output: str | None = None,
            search: str | None = None) -> dict:
    status = {"phase": "Succeeded", "attempts": 1, "conditions": [], "metrics": {}}
    if gpu_hours is not None:
        status["cost"] = {"wallSeconds": gpu_hours * H / 8, "cpuSeconds": gpu_hours * H * 4, "gpus": 8,
                          "gpuSeconds": gpu_hours * H, "peakMemoryBytes": 64 * 2**30, "attempts": 1}
    if output:
        status["output"] = {"uri": Path(output).as_uri()}
    labels = {"labels": {LABEL_SEARCH: search}} if search else {}
    return manifest(kind, name, spec, metadata=labels, status=status)


def _eval(tmp: Path, name: str, model: tuple[str, str], scores: dict[str, float]) -> dict:
    out = tmp / "outputs" / "eval" / name
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"benchmarks": {b: {"pass1": v, "stderr": 0.01}
                                                                 for b, v in scores.items()}}))
    return _record("Eval", name, {"model": _ref(*model), "benchmarks": [{"name": b} for b in scores]}, 0.5, str(out))


def tinyr1_workdir(tmp: Path) -> Workdir:
    """TinyR1's shape with its Table 2 costs: branches, (math ⊕ science) ⊕ code, and a mixed-data SFT."""
    wd = Workdir.at(tmp / "wd")
    store = StatusFiles(wd)
    base = {"base": {"uri": "hf://org/backbone"}}
    docs = [
        _record("BranchSFT", "base", {**base, "data": [{"uri": "file:///d/general.jsonl"}]}, 50),  # shared
        _record("BranchSFT", "math", {"base": _ref("BranchSFT", "base"), "data": [{"uri": "file:///d/m.jsonl"}],
                                      "domain": "math"}, 300),
        _record("BranchSFT", "science", {"base": _ref("BranchSFT", "base"), "data": [{"uri": "file:///d/s.jsonl"}],
                                         "domain": "science"}, 100),
        _record("BranchSFT", "code", {"base": _ref("BranchSFT", "base"), "data": [{"uri": "file:///d/c.jsonl"}],
                                      "domain": "code"}, 250),
        _record("BranchSFT", "mixed", {"base": _ref("BranchSFT", "base"),
                                       "data": [{"uri": f"file:///d/{d}.jsonl"} for d in "msc"]}, 740),
        _record("Merge", "mid", {"method": "arcee_fusion", "base": _ref("BranchSFT", "science"),
                                 "models": [_ref("BranchSFT", "math"), _ref("BranchSFT", "science")]}, 1.5),
        _record("Merge", "final", {"method": "arcee_fusion", "base": _ref("BranchSFT", "code"),
                                   "models": [_ref("Merge", "mid"), _ref("BranchSFT", "code")]}, 2.5),
        _record("Merge", "unevaluated", {"method": "linear", "models": [_ref("BranchSFT", "math")]}, None),
        # a teacher's SFT on several datasets from another base: not the mixed-data baseline
        _record("BranchSFT", "teacher", {"base": {"uri": "hf://org/teacher"},
                                         "data": [{"uri": "file:///d/a.jsonl"}, {"uri": "file:///d/b.jsonl"}]}, 20),
        # a MergeSearch over the three branches (its base is the shared backbone): its trials are its cost
        _record("MergeSearch", "search", {"base": _ref("BranchSFT", "base"),
                                          "branches": [{"name": d, "model": _ref("BranchSFT", d)}
                                                       for d in ("math", "science", "code")]}, None),
        _record("Merge", "search-m-1", {"method": "ties", "models": []}, 1.0, search="search"),
        _record("Eval", "search-e-1", {"model": _ref("Merge", "search-m-1")}, 0.25, search="search"),
        _eval(tmp, "eval-search", ("MergeSearch", "search"), {"aime": 0.70, "gpqa": 0.60}),
        _eval(tmp, "eval-final", ("Merge", "final"), {"aime": 0.781, "gpqa": 0.650}),
        _eval(tmp, "eval-mixed", ("BranchSFT", "mixed"), {"aime": 0.753, "gpqa": 0.657}),
    ]
    for doc in docs:
        store.save(doc)
    return wd


def _rows(section: str) -> list[list[str]]:
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", section, re.S)][1:]


def test_cost_table_and_table2_comparison(tmp_path):
    page = build_html(gather(tinyr1_workdir(tmp_path)))
    cost = page[page.index("<h2>Cost</h2>"):]
    cost = cost[:cost.index("<h2>", 5)]  # up to the next section
    table, comparison = cost.split("<h3>Branch + merge against mixed-data retraining</h3>")
    rows = {r[0]: r for r in _rows(table)}
    # stage, attempts, wall, CPU-s, GPUs, GPU-s, peak memory
    assert rows["BranchSFT/mixed"][1:] == ["1", "92h30m", f"{740 * H * 4:.1f}", "8", f"{740 * H:.1f}", "64.0 GiB"]
    assert "Merge/unevaluated" not in rows  # no cost recorded: not listed
    total_gpu_h = 50 + 300 + 100 + 250 + 740 + 1.5 + 2.5 + 0.5 + 0.5 + 20 + 1.0 + 0.25 + 0.5
    assert rows["Merge/search-m-1 (trial of search)"][5] == f"{1.0 * H:.1f}"
    assert rows["total"][5] == f"{total_gpu_h * H:.1f}"

    table2 = {r[0]: r for r in _rows(comparison)}
    # model, training, merging, total (GPU-h), wall, aime, gpqa; the shared base is in neither route
    assert table2["mixed-data SFT: mixed"] == ["mixed-data SFT: mixed", "740", "-", "740", "92h30m", "75.3", "65.7"]
    assert table2["branch + merge: final"][1:4] == ["650", "4", "654"]
    assert table2["branch + merge: final"][5:] == ["78.1", "65.0"]
    assert "mixed-data SFT: teacher" not in table2
    # the search: the same three branches (not the backbone it names as base), every trial as merging cost
    assert table2["branch + merge: search"][1:4] == ["650", "1.25", "651"]
    assert "merging costs 0.5% of the mixed-data retraining (mixed)" in comparison
    assert f"branches and merges together {654 / 740:.2f}x" in comparison


def test_no_comparison_without_a_mixed_baseline(tmp_path):
    wd = tinyr1_workdir(tmp_path)
    (wd.status_file("BranchSFT/mixed")).unlink()
    (wd.status_file("Eval/eval-mixed")).unlink()
    page = build_html(gather(wd))
    assert "<h2>Cost</h2>" in page and "mixed-data retraining</h3>" not in page


def test_format_cost():
    cost = {"wallSeconds": 4 * H, "cpuSeconds": 90.5, "gpus": 8, "gpuSeconds": 32 * H, "peakMemoryBytes": 3 * 2**30,
            "attempts": 2}
    assert format_cost(cost) == "wall 4h00m, CPU 1m30s, GPU 32.00 h (8 GPUs), peak memory 3.0 GiB, 2 attempts"
    assert format_cost({"wallSeconds": 2.25, "cpuSeconds": 1.0, "gpus": 0, "gpuSeconds": 0}) == \
        "wall 2.2 s, CPU 1.0 s, no GPU"
    assert format_cost(None) == "not measured"


def test_status_table_shows_cost_once_measured():
    from datetime import datetime, timezone

    from branchmerge.operator.local.table import get_table

    def rec(kind, name, cost=None):
        status = {"phase": "Succeeded", "conditions": [], "startTime": "2026-01-01T00:00:00Z",
                  "completionTime": "2026-01-01T00:00:10Z"}
        if cost:
            status["cost"] = cost
        return {"kind": kind, "metadata": {"name": name}, "spec": {}, "status": status}

    text = get_table([rec("Merge", "cpu", {"cpuSeconds": 12.345, "gpuSeconds": 0}),
                      rec("Merge", "gpu", {"cpuSeconds": 1.0, "gpuSeconds": 2 * H}), rec("Merge", "old"),
                      rec("Eval", "e")], now=datetime(2026, 1, 1, 0, 1, tzinfo=timezone.utc))
    merges, evals = text.split("\n\n")
    lines = merges.splitlines()
    assert lines[0].split() == ["MERGES", "PHASE", "REASON", "METHOD", "PROGRESS", "DURATION", "COST", "AGE"]
    assert "12.3 CPU-s" in lines[1] and "2.00 GPU-h" in lines[2] and lines[3].split()[-2] == "-"
    assert "COST" not in evals.splitlines()[0]  # no Eval measured: no column
