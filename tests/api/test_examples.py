"""Every shipped example validates and round-trips: YAML -> model -> dict equals the YAML modulo defaults."""
from pathlib import Path

import pytest
import yaml

from branchmerge.api.manifests import load, manifest_files
from branchmerge.api.validation import parse_resource

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _docs():
    for path in manifest_files([EXAMPLES]):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("branchmerge.dev/"):
                yield pytest.param(doc, id=f"{path.relative_to(EXAMPLES)}#{i}")


def _is_subset(small, big, path="") -> list[str]:
    if isinstance(small, dict):
        if not isinstance(big, dict):
            return [path]
        return [p for k, v in small.items() for p in _is_subset(v, big.get(k), f"{path}.{k}")]
    if isinstance(small, list):
        if not isinstance(big, list) or len(small) != len(big):
            return [path]
        return [p for i, (a, b) in enumerate(zip(small, big)) for p in _is_subset(a, b, f"{path}[{i}]")]
    return [] if small == big or (isinstance(small, (int, float)) and small == big) else [path]


@pytest.mark.parametrize("doc", list(_docs()))
def test_example_round_trips(doc):
    resource = parse_resource(doc)
    wire = resource.wire()
    assert _is_subset(doc, wire) == []  # nothing written was lost or changed
    assert parse_resource(wire) == resource  # and defaults are stable


# Each folder is one pipeline, as `branchmerge run -f` or `kubectl apply -f` takes it (names repeat across them).
FOLDERS = sorted(p for p in EXAMPLES.iterdir() if p.is_dir() and manifest_files([p]))


def test_every_example_folder_is_a_pipeline_of_its_own():
    assert [p.name for p in FOLDERS][:2] == ["01-minimal", "02-merge-methods"]
    assert {"cluster", "quickstart", "tinyr1"} <= {p.name for p in FOLDERS}
    assert not manifest_files(EXAMPLES.glob("*.y*ml"))  # no manifest outside a folder


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_example_folder_validates_as_a_set(folder):
    result = load([folder])
    assert result.problems == [] and result.resources  # load checks names, from: references and cycles


def test_tinyr1_example_is_the_paper_recipe():
    result = load([EXAMPLES / "tinyr1"])
    by_key = {r.key: r for r in result.resources}
    mid, final = by_key["Merge/math-science"].spec, by_key["Merge/tinyr1"].spec
    assert mid.method == final.method == "arcee_fusion"
    assert [m.from_.name for m in mid.models] == ["math", "science"] and mid.base.from_.name == "science"
    assert [m.from_.name for m in final.models] == ["math-science", "code"] and final.base.from_.name == "code"
    sft = {k.split("/")[1]: r.spec for k, r in by_key.items() if k.startswith("BranchSFT/")}
    assert {d: s.training.epochs for d, s in sft.items()} == {"math": 5, "science": 5, "code": 15}
    assert {d: s.training.packing for d, s in sft.items()} == {"math": "greedy", "science": "neat", "code": "neat"}
    assert all(s.training.learning_rate == 1e-5 and s.deepspeed.zero_stage == 3 and s.training.max_seq_len == 16384
               for s in sft.values())
    ev = by_key["Eval/tinyr1"].spec
    assert {b.name: b.samples for b in ev.benchmarks} == {"aime24": 16, "livecodebench": 4, "gpqa-diamond": 4}
    assert (ev.sampling.temperature, ev.sampling.top_p, ev.sampling.max_tokens) == (0.6, 0.95, 32768)
