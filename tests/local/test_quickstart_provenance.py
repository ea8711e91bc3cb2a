"""Provenance of the reduced quickstart (the session's run): every model has a card with the recipe, cost and
the scores of its Evals; `branchmerge lineage` walks a merge back to the raw inputs; and a second fresh run on
this machine makes bit-identical models, datasets and eval records (the same Eval scores)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from branchmerge.api.outputs import CARD

pytestmark = pytest.mark.slow


def _front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---", 2)[1])


def test_every_model_has_a_card_with_recipe_cost_and_scores(reduced_quickstart):
    root, proc = reduced_quickstart
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    models = [f for kind in ("branchsft", "merge") for f in sorted((root / "outputs" / kind).iterdir())
              if (f / "_manifest.json").is_file()]
    assert len(models) >= 9  # 5 branches, the quickstart's merges and the search's trial merges
    for folder in models:
        text = (folder / CARD).read_text()
        assert text.startswith("---\n") and "## Recipe" in text and "## Cost" in text and "## Lineage" in text, folder
    merged = (root / "outputs" / "merge" / "qs-merged" / CARD).read_text()
    meta = _front_matter(merged)
    results = json.loads((root / "outputs" / "eval" / "qs-eval-merged" / "results.json").read_text())
    index = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]}
    assert index == {name: b["pass1"] for name, b in results["benchmarks"].items()}  # the Eval's own numbers
    for name, b in results["benchmarks"].items():
        assert f"| qs-eval-merged | {name} | {b['pass1']:.3f} | {b['stderr']:.3f} | {b['samples']} |" in merged
    # the recipe reaches back to the teacher and the traces' counts, which the TeacherGen's dataset recorded
    counts = json.loads((root / "outputs" / "teachergen" / "qs-traces-math" / "teachergen.json").read_text())["counts"]
    assert (f"TeacherGen `qs-traces-math`**: teacher `{(root / 'outputs' / 'branchsft' / 'qs-teacher').as_uri()}`"
            in merged)
    assert f"{counts['samplesKept']} traces kept of {counts['samplesGenerated']} generated" in merged
    assert "**Merge `qs-math-science`**: arcee_fusion" in merged and "**BranchSFT `qs-code`** (domain code)" in merged


def test_lineage_walks_a_merge_back_to_the_raw_inputs(reduced_quickstart):
    root, _ = reduced_quickstart
    out = subprocess.run([sys.executable, "-m", "branchmerge.cli", "lineage", "Merge/qs-merged", "--workdir",
                          str(root), "-o", "json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    nodes, stack = [], [json.loads(out.stdout)]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.get("inputs", []))
    kinds = {n.get("kind") for n in nodes}
    assert kinds == {"Merge", "BranchSFT", "TeacherGen", None}
    inputs = (root / "inputs").resolve().as_uri()
    leaves = {n["uri"] for n in nodes if "kind" not in n}
    assert all(u.startswith(inputs) for u in leaves)
    assert {u.rsplit("/", 1)[-1] for u in leaves} >= {"student-init", "teacher-init", "qs-math-prompts.jsonl",
                                                      "qs-code-prompts.jsonl", "qs-science-prompts.jsonl"}
    statuses = {p.stem: json.loads(p.read_text())["status"] for p in (root / "status").glob("*/*.json")}
    for n in nodes:
        if "kind" in n:
            assert n["digest"] == statuses[n["name"]]["output"]["digest"], n["name"]


def test_two_fresh_runs_make_identical_outputs(reduced_quickstart, output_content, tmp_path):
    """Reproducibility, stated: the same machine, a fresh folder, the same bits. (Another CPU's float kernels
    give other numbers; the README says so and shows which machine printed its table.)"""
    root, _ = reduced_quickstart
    again = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "branchmerge.cli", "quickstart", str(again), "--size", "reduced",
                           "--plain"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outputs = {}
    for base in (root, again):
        found = sorted(p.relative_to(base / "outputs") for p in (base / "outputs").glob("*/*")
                       if (p / "_manifest.json").is_file())
        # the search's children are named by their spec's hash, which holds the run folder's input URIs: compare
        # them as a set of contents per kind; the pipeline's own stages by name
        outputs[base] = ({rel: output_content(base / "outputs" / rel) for rel in found
                          if not rel.name.startswith("qs-search-")},
                         sorted((rel.parts[0], sorted(output_content(base / "outputs" / rel).items()))
                                for rel in found if rel.name.startswith("qs-search-")))
    (named, searched), (named_again, searched_again) = outputs[root], outputs[again]
    assert len(named) >= 15 and len(searched) >= 4
    assert named == named_again
    assert searched == searched_again
    first = sorted(named)
    for rel in (r for r in first if r.parts[0] == "eval"):
        scores = [json.loads((base / "outputs" / rel / "results.json").read_text())["benchmarks"]
                  for base in (root, again)]
        assert [{n: b["pass1"] for n, b in s.items()} for s in scores][0] == \
            [{n: b["pass1"] for n, b in s.items()} for s in scores][1], rel
