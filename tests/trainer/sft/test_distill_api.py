"""The distillation methods' manifest fields: defaults as in the papers, bad combinations rejected at their field."""
from __future__ import annotations

import copy

import pytest

from branchmerge.api.validation import InvalidManifest, parse_resource

TEACHER = {"uri": "file:///models/teacher"}
BASE = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "BranchSFT", "metadata": {"name": "b"},
        "spec": {"base": {"uri": "file:///models/base"},
                 "data": [{"uri": "file:///data/math.jsonl", "domain": "math"}, {"uri": "file:///data/code.jsonl"}],
                 "objective": {"type": "kd", "teacher": TEACHER}}}


def doc(**objective) -> dict:
    d = copy.deepcopy(BASE)
    d["spec"]["objective"].update(objective)
    return d


def test_paper_defaults():
    obj = parse_resource(doc(divergence="taid", ddk={})).spec.objective
    assert (obj.taid_schedule, obj.taid_start, obj.taid_end, obj.taid_alpha, obj.taid_beta) == (
        "adaptive", 0.4, 1.0, 5e-4, 0.99)
    assert (obj.sinkhorn_form, obj.sinkhorn_iterations, obj.sinkhorn_epsilon) == ("batch", 20, 0.1)
    assert (obj.ddk.every_steps, obj.ddk.smoothing, obj.ddk.validation_samples) == (1000, 0.5, 64)


@pytest.mark.parametrize("patch, path, fragment", [
    ({"taidStart": 0.9, "taidEnd": 0.5}, "spec.objective.taidStart", "must not exceed taidEnd"),
    ({"taidSchedule": "cosine"}, "spec.objective.taidSchedule", "must be one of"),
    ({"taidBeta": 1}, "spec.objective.taidBeta", "must be < 1"),
    ({"sinkhornEpsilon": 0}, "spec.objective.sinkhornEpsilon", "must be > 0"),
    ({"sinkhornIterations": 0}, "spec.objective.sinkhornIterations", "must be >= 1"),
    ({"sinkhornForm": "sample"}, "spec.objective.sinkhornForm", "must be one of"),
    ({"ddk": {"smoothing": 1.5}}, "spec.objective.ddk.smoothing", "must be <= 1"),
    ({"type": "sft", "teacher": None, "ddk": {}}, "spec.objective.ddk", "needs type kd and a teacher"),
])
def test_rejected_at_the_field(patch, path, fragment):
    d = doc(**patch)
    if d["spec"]["objective"].get("teacher") is None:
        del d["spec"]["objective"]["teacher"]
    with pytest.raises(InvalidManifest) as info:
        parse_resource(d)
    errors = info.value.errors
    assert [e.path for e in errors if fragment in e.message] == [path], [str(e) for e in errors]


def test_ddk_needs_two_datasets():
    d = doc(ddk={})
    d["spec"]["data"] = d["spec"]["data"][:1]
    with pytest.raises(InvalidManifest) as info:
        parse_resource(d)
    assert [e.path for e in info.value.errors if "at least two datasets" in e.message] == ["spec.objective.ddk"]
