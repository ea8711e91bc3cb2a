"""The graded examples (examples/NN-*/) run as their READMEs say: the folder's make_inputs.py, then
`branchmerge run -f` on the folder, through the real CLI. Each test checks that the stages succeeded and
published their outputs, and one thing its example is there to show.

The manifests read their inputs from /tmp/branchmerge-examples/<example>/ (file:// URIs are absolute);
here the inputs go to tmp_path, and a copy of the manifests points there (that prefix is all that changes).
"""
from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from branchmerge.api.graph import input_refs

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
INPUTS_ROOT = "/tmp/branchmerge-examples"
GRADED = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]-*") if p.is_dir())


class Run:
    """A finished example run: its workdir and what the stages published."""

    def __init__(self, workdir: Path, output_content):
        self.workdir = workdir
        self._content = output_content

    def status(self, key: str) -> dict:
        kind, name = key.split("/")
        return json.loads((self.workdir / "status" / kind.lower() / f"{name}.json").read_text())["status"]

    def output(self, key: str) -> Path:
        """The stage's published output folder, after checking it succeeded and its manifest is intact."""
        st = self.status(key)
        assert st["phase"] == "Succeeded", (key, st)
        folder = Path(st["output"]["uri"].removeprefix("file://"))
        assert self._content(folder), f"{key}: published nothing"
        return folder

    def tensors(self, key_or_folder) -> dict:
        from safetensors.torch import load_file

        folder = key_or_folder if isinstance(key_or_folder, Path) else self.output(key_or_folder)
        return {n: t for f in sorted(folder.glob("*.safetensors")) for n, t in load_file(f).items()}


def run_example(name: str, tmp_path: Path, output_content) -> tuple[Path, Run]:
    """make_inputs.py into tmp_path/inputs, then `branchmerge run -f` on a copy of the manifests reading there."""
    inputs, manifests, workdir = tmp_path / "inputs", tmp_path / "manifests", tmp_path / "wd"
    script = EXAMPLES / name / "make_inputs.py"
    argv = sys.argv
    sys.argv = [str(script), str(inputs)]
    try:  # in this process: torch and transformers are imported once for all the examples
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    manifests.mkdir()
    prefix = f"file://{INPUTS_ROOT}/{name}/"
    for path in (EXAMPLES / name).glob("*.yaml"):
        (manifests / path.name).write_text(path.read_text().replace(prefix, inputs.as_uri() + "/"))
    proc = subprocess.run([sys.executable, "-m", "branchmerge.cli", "run", "-f", str(manifests), "--workdir",
                           str(workdir), "--plain"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return inputs, Run(workdir, output_content)


def test_every_graded_example_has_a_test_a_script_and_a_readme():
    assert GRADED[0] == "01-minimal" and len(GRADED) == len(CHECKS)
    assert set(GRADED) == set(CHECKS)
    for name in GRADED:
        folder = EXAMPLES / name
        assert (folder / "make_inputs.py").is_file() and (folder / "README.md").is_file(), name
        uris = [ref.uri for path in folder.glob("*.yaml") for doc in yaml.safe_load_all(path.read_text())
                for ref in input_refs(doc["spec"]) if ref.uri]
        # every input is a file its script writes, so that the two commands of its README suffice
        assert uris and all(u.startswith(f"file://{INPUTS_ROOT}/{name}/") for u in uris), (name, uris)


# ---- one check per example --------------------------------------------------------------------------------

def check_minimal(inputs: Path, run: Run) -> None:
    merged = run.tensors("Merge/average")
    a, b = run.tensors(inputs / "model-a"), run.tensors(inputs / "model-b")
    assert merged.keys() == a.keys() == b.keys()
    differ = [n for n in merged if not a[n].equal(b[n])]  # the norms' weights start as ones in both
    assert len(differ) > len(merged) / 2
    for name in differ:
        assert not merged[name].equal(a[name]) and not merged[name].equal(b[name]), name
    for name, m in merged.items():  # linear with equal weights: the mean, between the two inputs
        assert ((m >= a[name].minimum(b[name]) - 1e-6) & (m <= a[name].maximum(b[name]) + 1e-6)).all(), name
        assert (m - (a[name] + b[name]) / 2).abs().max() < 1e-5, name


def check_merge_methods(inputs: Path, run: Run) -> None:
    import torch

    base, math_, code = (run.tensors(inputs / n) for n in ("base", "math", "code"))
    ties = run.tensors("Merge/ties-math-code")
    assert all(t.dtype == torch.bfloat16 for t in ties.values())  # outDtype
    w = "model.layers.0.mlp.up_proj.weight"
    assert not ties[w].float().equal(base[w]) and not ties[w].float().equal(math_[w])
    slerp = run.tensors("Merge/slerp-base-math")
    for name, t in (("model.layers.0.self_attn.q_proj.weight", 0.3), ("model.layers.0.mlp.up_proj.weight", 0.7)):
        # the override's t: the share of the way from the base to the math model (0.3 attention, 0.7 MLP)
        along = (slerp[name] - base[name]).norm() / (math_[name] - base[name]).norm()
        assert abs(float(along) - t) < 0.02, (name, float(along))


def check_branchsft(inputs: Path, run: Run) -> None:
    run.output("BranchSFT/math-sft")
    m = run.status("BranchSFT/math-sft")["metrics"]
    assert math.isfinite(m["finalLoss"]) and m["finalLoss"] < m["initialLoss"]
    assert m["records"] == 96 and m["samples"] == 3 * 64 + 32  # the traces weigh 3, the Parquet table 1
    assert m["gradientAccumulation"] == 2 and m["zeroStage"] == 2 and m["checkpointBytes"] > 0


def check_distillation(inputs: Path, run: Run) -> None:
    expected = {"math-kd": "jsd", "math-taid": "taid", "science-sinkhorn": "sinkhorn", "mixed-ddk": "forward-kl"}
    for name, divergence in expected.items():
        run.output(f"BranchSFT/{name}")
        m = run.status(f"BranchSFT/{name}")["metrics"]
        assert m["divergence"] == divergence and math.isfinite(m["finalLoss"]) and math.isfinite(m["finalDivergence"])
    assert run.status("BranchSFT/math-taid")["metrics"]["taidSchedule"] == "adaptive"
    weights = run.status("BranchSFT/mixed-ddk")["metrics"]["domainWeights"]
    assert set(weights) == {"math", "code", "science"} and abs(sum(weights.values()) - 1) < 1e-4


def _traces(run: Run, key: str, prompts: int, samples: int) -> int:
    """The TeacherGen's counts add up; returns the traces kept (at least one: the teacher was taught)."""
    folder = run.output(key)
    counts = json.loads((folder / "teachergen.json").read_text())["counts"]
    assert counts["prompts"] == counts["promptsDone"] == prompts
    assert counts["samplesGenerated"] == prompts * samples
    assert counts["samplesKept"] + counts["samplesRejected"] == counts["samplesGenerated"]
    kept = len((folder / "data.jsonl").read_text().splitlines())
    assert kept == counts["samplesKept"] == counts["promptsWithSamples"] >= 1  # first-correct: one per prompt
    return kept


def check_teachergen(inputs: Path, run: Run) -> None:
    _traces(run, "TeacherGen/math-traces", prompts=16, samples=4)
    assert run.status("TeacherGen/math-traces")["metrics"]["samplesGenerated"] == 64


def _scores(run: Run, key: str, samples: dict[str, int]) -> dict:
    results = json.loads((run.output(key) / "results.json").read_text())
    assert 0.0 <= results["score"] <= 1.0
    for name, k in samples.items():
        bench = results["benchmarks"][name]
        assert bench["samples"] == k and 0.0 <= bench["pass1"] <= 1.0 and bench["n"] > 0, name
    assert set(results["benchmarks"]) == set(samples)
    return results


def check_eval(inputs: Path, run: Run) -> None:
    results = _scores(run, "Eval/tiny-model", {"gpqa-style": 4, "arithmetic": 2, "stdin-programs": 1})
    assert results["benchmarks"]["gpqa-style"]["n"] == len((inputs / "eval-mcq.jsonl").read_text().splitlines())


def check_pipeline(inputs: Path, run: Run) -> None:
    kept = _traces(run, "TeacherGen/pipeline-traces", prompts=24, samples=4)
    assert run.status("BranchSFT/pipeline-math")["metrics"]["records"] == kept  # it learnt the kept traces
    merged = run.tensors("Merge/pipeline-merged")
    for branch in ("pipeline-math", "pipeline-science"):  # Arcee Fusion: some of math's entries, science's elsewhere
        theirs = run.tensors(f"BranchSFT/{branch}")
        assert any(not merged[n].equal(theirs[n]) for n in merged), branch
    _scores(run, "Eval/pipeline-merged", {"math": 2, "science": 2})


CHECKS = {"01-minimal": check_minimal, "02-merge-methods": check_merge_methods, "03-branchsft": check_branchsft,
          "04-distillation": check_distillation, "05-teachergen": check_teachergen, "06-eval": check_eval,
          "07-pipeline": check_pipeline}


@pytest.mark.slow  # real stages: from seconds (01) to minutes (05, 07) on 2 cores
@pytest.mark.parametrize("name", GRADED)
def test_example_runs(name, tmp_path, output_content):
    inputs, run = run_example(name, tmp_path, output_content)
    CHECKS[name](inputs, run)
