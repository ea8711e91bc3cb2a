"""operator/resolve.py on CRs as the API server stores them: what keeps a CR from starting, the manifest its
stage runs (every ``from:`` replaced by its upstream's output), and the hash that names a resolved run."""
from __future__ import annotations

import copy
import re

import pytest

from branchmerge.api.graph import references
from branchmerge.api.validation import parse_resource
from branchmerge.operator.resolve import blockers, resolve, spec_hash

from .kube_objects import MERGE_SPEC, cr, pipeline

# What the API server adds to a stored object besides cr()'s uid, generation and resourceVersion
SERVER_META = {"creationTimestamp": "2026-01-01T00:00:00Z",
               "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update"}]}
RUNNING = {"phase": "Running", "conditions": [{"type": "Ready", "status": "False", "reason": "Running"}]}


def stored(kind: str, name: str, spec: dict, **meta) -> object:
    return parse_resource(cr(kind, name, spec, status=copy.deepcopy(RUNNING), **SERVER_META, **meta))


# A Merge whose base and one of three models come from upstreams, with per-model parameters next to the refs
FUSED = {"method": "ties", "base": {"from": {"kind": "Merge", "name": "soup"}},
         "models": [{"uri": "pvc://models/a", "density": 0.5},
                    {"from": {"kind": "BranchSFT", "name": "math"}, "density": 0.7, "weight": 2},
                    {"from": {"kind": "Merge", "name": "soup"}, "density": 0.3}]}
UPSTREAMS = {"Merge/soup": "pvc://outputs/merge/soup", "BranchSFT/math": "hf://org/math@abc123"}


def test_every_from_becomes_its_upstreams_uri_and_keeps_its_siblings():
    doc = resolve(stored("Merge", "fused", FUSED), UPSTREAMS)
    spec = doc["spec"]
    assert spec["base"] == {"uri": "pvc://outputs/merge/soup"}
    assert spec["models"] == [{"uri": "pvc://models/a", "density": 0.5},
                              {"uri": "hf://org/math@abc123", "density": 0.7, "weight": 2},
                              {"uri": "pvc://outputs/merge/soup", "density": 0.3}]
    assert "from" not in repr(doc)


def test_the_resolved_manifest_is_what_the_user_wrote_without_status_or_defaults():
    resource = stored("Merge", "fused", FUSED)
    doc = resolve(resource, UPSTREAMS)
    assert doc["apiVersion"] == "branchmerge.dev/v1alpha1" and doc["kind"] == "Merge"
    assert "status" not in doc  # the stage runs a spec; the server's view of progress is not part of it
    assert doc["metadata"]["name"] == "fused" and doc["metadata"]["namespace"] == "ns"
    # defaults stay implicit, so the stage can tell what was asked for: no fields the user left out
    assert set(doc["spec"]) == {"method", "base", "models"}
    # and the CR itself is not changed: resolving twice gives the same manifest
    assert resolve(resource, UPSTREAMS) == doc
    assert [r.key for r in references(resource)] == ["Merge/soup", "BranchSFT/math", "Merge/soup"]


def test_each_kind_of_the_pipeline_resolves_its_refs():
    docs = [parse_resource(d) for d in pipeline()]
    outputs = {r.key: f"pvc://outputs/{r.kind.lower()}/{r.metadata.name}" for r in docs}
    specs = {r.kind: resolve(r, outputs)["spec"] for r in docs}
    assert specs["BranchSFT"]["data"] == [{"uri": "pvc://outputs/teachergen/gen"}]
    assert specs["Merge"]["models"] == [{"uri": "pvc://outputs/branchsft/sft"}, {"uri": "pvc://models/other"}]
    assert specs["Eval"]["model"] == {"uri": "pvc://outputs/merge/merge"}
    assert specs["TeacherGen"]["teacher"] == {"model": {"uri": "pvc://models/teacher"}}  # nothing to resolve


def test_precomputed_refs_give_the_same_manifest():
    resource = stored("Merge", "fused", FUSED)
    assert resolve(resource, UPSTREAMS, refs=references(resource)) == resolve(resource, UPSTREAMS)


def test_default_output_only_when_the_spec_names_none():
    without = {k: v for k, v in MERGE_SPEC.items() if k != "output"}
    assert resolve(stored("Merge", "m", without), {}, "pvc://outputs/merge/m")["spec"]["output"] == \
        {"uri": "pvc://outputs/merge/m"}
    assert resolve(stored("Merge", "m", MERGE_SPEC), {}, "pvc://outputs/merge/m")["spec"]["output"] == \
        {"uri": "pvc://models/merged"}
    # no default to give: the output stays unset (the stage's own rules apply)
    assert "output" not in resolve(stored("Merge", "m", without), {})["spec"]


def test_resolving_before_the_upstreams_finished_is_a_key_error():
    # callers ask blockers() first; an upstream missing from outputs is a programming error, not a default
    with pytest.raises(KeyError, match="BranchSFT/math"):
        resolve(stored("Merge", "fused", FUSED), {"Merge/soup": "pvc://outputs/merge/soup"})


def test_no_blockers_once_every_upstream_succeeded():
    resource = stored("Merge", "fused", FUSED)
    assert blockers(resource, {"Merge/soup": "Succeeded", "BranchSFT/math": "Succeeded"}) == []
    assert blockers(stored("Merge", "plain", MERGE_SPEC), {}) == []  # no refs, nothing to wait for


def test_blockers_name_reason_ref_and_field_path_worst_first():
    resource = stored("Merge", "fused", FUSED)
    found = blockers(resource, {"Merge/soup": "Running"})
    # a missing upstream comes before ones still running, whatever the spec's order
    assert [(b.reason, b.ref.key, b.ref.path) for b in found] == [
        ("UpstreamNotFound", "BranchSFT/math", "spec.models[1].from"),
        ("UpstreamNotReady", "Merge/soup", "spec.base.from"),
        ("UpstreamNotReady", "Merge/soup", "spec.models[2].from")]
    assert found[0].message == "BranchSFT/math (at spec.models[1].from) does not exist"
    assert found[1].message == "waiting for Merge/soup (at spec.base.from), now Running"

    failed = blockers(resource, {"Merge/soup": None, "BranchSFT/math": "Failed"})
    assert [b.reason for b in failed] == ["UpstreamFailed", "UpstreamNotReady", "UpstreamNotReady"]
    assert failed[0].message == "BranchSFT/math (at spec.models[1].from) failed"
    # an upstream that exists but has no status yet is reported as Pending
    assert failed[1].message == "waiting for Merge/soup (at spec.base.from), now Pending"


def test_spec_hash_names_the_run_not_the_object():
    resource = stored("Merge", "fused", FUSED)
    doc = resolve(resource, UPSTREAMS)
    digest = spec_hash(doc)
    assert re.fullmatch(r"[0-9a-f]{10}", digest)
    # another name, namespace, uid or status does not make another run
    other = parse_resource(cr("Merge", "renamed", FUSED, generation=7, status={"phase": "Succeeded"}))
    assert spec_hash(resolve(other, UPSTREAMS)) == digest
    # key order does not matter (the hash is over canonical JSON)
    assert spec_hash({"spec": dict(reversed(list(doc["spec"].items()))), "kind": "Merge"}) == digest
    # another input URI, another parameter or another kind does
    moved = dict(UPSTREAMS, **{"BranchSFT/math": "hf://org/math@def456"})
    assert spec_hash(resolve(resource, moved)) != digest
    denser = copy.deepcopy(FUSED)
    denser["models"][0]["density"] = 0.6
    assert spec_hash(resolve(stored("Merge", "fused", denser), UPSTREAMS)) != digest
    assert spec_hash(dict(doc, kind="Eval")) != digest
