"""The CPU quickstart: its committed manifests match the generator, and a reduced run goes end to end
(teacher SFT -> TeacherGen with vLLM -> branches -> merges -> evals -> report), checked by its result files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from branchmerge.api.manifests import load
from branchmerge.quickstart.manifests import pipeline

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
EXAMPLE_INPUTS = "/tmp/branchmerge-quickstart/inputs"


def test_committed_example_manifests_match_the_generator():
    committed = [d for f in sorted(EXAMPLE.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    assert committed == pipeline(EXAMPLE_INPUTS, "full"), \
        "examples/quickstart drifted: regenerate with `branchmerge quickstart --prepare-only /tmp/branchmerge-quickstart`" \
        " and copy manifests/*.yaml"
    result = load([EXAMPLE])
    assert result.ok, result.problems
    order = result.dag().order()
    # TinyR1's chain: (math + science, base science) + code, base code
    assert order.index("Merge/qs-math-science") < order.index("Merge/qs-merged")
    merged = next(r for r in result.resources if r.key == "Merge/qs-merged")
    assert merged.spec.method == "arcee_fusion" and merged.spec.base.from_.name == "qs-code"


@pytest.mark.slow
def test_reduced_quickstart_end_to_end(reduced_quickstart):
    root, proc = reduced_quickstart
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    every = {p.parent.name + "/" + p.stem: json.loads(p.read_text()) for p in (root / "status").glob("*/*.json")}
    # the search's trials and reference Evals are stages of their own, labelled with the search
    statuses = {k: s for k, s in every.items() if "branchmerge.dev/search" not in s["metadata"].get("labels", {})}
    assert len(statuses) == len(pipeline(root / "inputs", "reduced"))
    assert all(s["status"]["phase"] == "Succeeded" for s in every.values())
    search = statuses["mergesearch/qs-search"]["status"]
    assert search["metrics"]["trialsDone"] == search["metrics"]["trialsTotal"] == 2  # the reduced grid's budget
    children = {k for k in every if k not in statuses}
    # a dev Eval per trial; the reduced search's meanPass1 compares with nothing, so no reference Evals
    assert sum(k.startswith("eval/") for k in children) == 2
    for domain in ("math", "code", "science"):
        gen = statuses[f"teachergen/qs-traces-{domain}"]["status"]
        assert gen["metrics"]["samplesKept"] > 0, gen["metrics"]
        assert (Path(gen["output"]["uri"].removeprefix("file://")) / "_manifest.json").exists()
    teacher = statuses["branchsft/qs-teacher"]["status"]["metrics"]
    assert teacher["finalLoss"] < teacher["initialLoss"]
    for name in ("qs-eval-student-base", "qs-eval-math", "qs-eval-merged", "qs-eval-merged-alt", "qs-eval-search"):
        out = Path(statuses[f"eval/{name}"]["status"]["output"]["uri"].removeprefix("file://"))
        results = json.loads((out / "results.json").read_text())
        assert set(results["benchmarks"]) == {"math", "code", "science"}
        assert all(0 <= b["pass1"] <= 1 and b["n"] > 0 for b in results["benchmarks"].values())
    html = (root / "report.html").read_text()
    for section in ("Pipeline", "Evaluation", "Training loss per branch", "TeacherGen acceptance", "Merge searches",
                    "Merges"):
        assert f"<h2>{section}</h2>" in html
    assert html.count("data:image/png;base64,") >= 5
    assert "What each merge keeps of each branch's gain" in html and "report:" in proc.stdout
    # the terminal's summary: a retained gain per merge and domain with its seed range, one verdict per merge
    assert "kept of each branch's gain over the base" in proc.stdout, proc.stdout[-3000:]
    verdict_lines = [line for line in proc.stdout.splitlines() if "above the base on every domain" in line]
    assert "qs-search: 2 of 2 trials on the dev split, leaderboard:" in proc.stdout
    assert len(verdict_lines) == 3 and all("under each eval seed (k=1)" in line for line in verdict_lines)  # reduced: k=1
