"""``branchmerge rescore`` on the reduced quickstart's Evals (the session's run, tests/conftest.py): every Eval's
saved generations re-grade to the same scores without a model, beside the old results, which stay untouched;
records without grading material re-grade the same from the benchmark datasets the Evals recorded."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from branchmerge.api.outputs import read_manifest, sha256_file
from branchmerge.trainer.eval.rescore import open_source, rescore
from branchmerge.trainer.publish import atomic_folder

SCORE_KEYS = ("pass1", "stderr", "passAtK", "n", "samples", "correct", "meanTokens", "p95Tokens", "truncated",
              "rejected", "reasons")


def _eval_outputs(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((root / "status" / "eval").glob("*.json")):
        status = json.loads(path.read_text())["status"]
        if status.get("phase") == "Succeeded":
            out[path.stem] = Path(status["output"]["uri"].removeprefix("file://"))
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_rescore_reproduces_every_quickstart_eval(reduced_quickstart, tmp_path):
    root, proc = reduced_quickstart
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outputs = _eval_outputs(root)
    assert {"qs-eval-student-base", "qs-eval-math", "qs-eval-merged", "qs-eval-search"} <= set(outputs)
    for name, folder in outputs.items():
        before = {p: sha256_file(p) for p in folder.rglob("*") if p.is_file()}
        run = subprocess.run([sys.executable, "-m", "branchmerge.cli", "rescore", str(folder), "--out",
                              str(tmp_path / name)], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        old = json.loads((folder / "results.json").read_text())
        new = json.loads((tmp_path / name / "results.json").read_text())
        assert new["score"] == old["score"], name
        for bench, b in old["benchmarks"].items():
            assert {k: new["benchmarks"][bench][k] for k in SCORE_KEYS} == {k: b[k] for k in SCORE_KEYS}, \
                (name, bench)
            assert _jsonl(tmp_path / name / "records" / f"{bench}.jsonl") == \
                _jsonl(folder / "records" / f"{bench}.jsonl")
            # the printed table: old and new pass@1 of each benchmark, no changed verdicts
            row = next(line.split() for line in run.stdout.splitlines() if line.startswith(bench + " "))
            assert row[2] == f"{100 * b['pass1']:.1f}" and row[3] == f"{100 * b['pass1']:.1f}" and row[-1] == "0"
        assert _jsonl(tmp_path / name / "changes.jsonl") == []
        assert {p: sha256_file(p) for p in folder.rglob("*") if p.is_file()} == before  # old results untouched
    # the quickstart's benchmarks include code: its samples ran in the sandbox again
    kinds = {b["kind"] for f in outputs.values()
             for b in json.loads((f / "results.json").read_text())["benchmarks"].values()}
    assert "code" in kinds


@pytest.mark.slow
def test_rescore_of_quickstart_records_without_grading_material(reduced_quickstart, tmp_path):
    """Eval outputs written before records carried their references re-grade from the recorded datasets."""
    root, proc = reduced_quickstart
    assert proc.returncode == 0
    folder = _eval_outputs(root)["qs-eval-merged"]
    with atomic_folder(tmp_path / "old") as out:
        results = json.loads((folder / "results.json").read_text())
        for b in results["benchmarks"].values():
            b.pop("fields", None)
        (out / "results.json").write_text(json.dumps(results))
        (out / "records").mkdir()
        for path in (folder / "records").glob("*.jsonl"):
            rows = _jsonl(path)
            for row in rows:
                row.pop("grading", None)
            (out / "records" / path.name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    new, changes = rescore(open_source(tmp_path / "old"), tmp_path / "new")
    assert changes == [] and new["score"] == results["score"]
    assert read_manifest(tmp_path / "new") is not None
    for bench in results["benchmarks"]:
        assert _jsonl(tmp_path / "new" / "records" / f"{bench}.jsonl") == _jsonl(folder / "records" / f"{bench}.jsonl")
