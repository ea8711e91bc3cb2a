"""The committed CRDs: generated from the models (no drift), structural, and their CEL rules behave.

No API server runs here, so the test plays its part: apply the schema's defaults to an object, then evaluate
every x-kubernetes-validations rule at its place in the schema, with two independent CEL implementations
(cel-python and the Rust `cel` bindings).
"""
from __future__ import annotations

import copy
from pathlib import Path

import cel as rust_cel
import celpy
import pytest
import yaml

from branchmerge.api.crdgen import render
from branchmerge.api.resources import KIND_INFO
from branchmerge.api.validation import InvalidManifest, parse_resource

from .conftest import valid
from .test_invalid_manifests import CASES, _set

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"


def _crd_file(kind):
    return CRD_DIR / f"branchmerge.dev_{KIND_INFO[kind].plural}.yaml"


def _schema(kind) -> dict:
    crd = yaml.safe_load(_crd_file(kind).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("kind", list(KIND_INFO))
def test_committed_crd_matches_models(kind):
    assert _crd_file(kind).read_text() == render(kind), "crds/ drifted: run `branchmerge crds --out crds`"


def _walk_schema(node, path="$"):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk_schema(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk_schema(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk_schema(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", list(KIND_INFO))
def test_schema_is_structural(kind):
    crd = yaml.safe_load(_crd_file(kind).read_text())
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["categories"] == ["branchmerge"] and crd["spec"]["names"]["shortNames"]
    assert [c["name"] for c in version["additionalPrinterColumns"]][:1] == ["Phase"]
    assert {"Progress", "Ready", "Age", KIND_INFO[kind].column[0]} <= {
        c["name"] for c in version["additionalPrinterColumns"]}
    for path, node in _walk_schema(version["schema"]["openAPIV3Schema"]):
        assert "type" in node, f"{path}: every schema node needs a type"
        assert not ("additionalProperties" in node and "properties" in node), path
        # propertyNames is no JSONSchemaProps field (apply fails with "unknown field"); patternProperties,
        # dependencies, definitions are refused for CRDs: map key constraints are CEL rules instead
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title", "const", "propertyNames", "patternProperties",
                          "dependencies", "definitions"):
            assert forbidden not in node, f"{path}: {forbidden} is not structural here"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        if node["type"] == "object" and "properties" not in node and "additionalProperties" not in node:
            assert node.get("x-kubernetes-preserve-unknown-fields") or path == "$.metadata", path
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec.get("description"), "kubectl explain needs descriptions"


# ---- an API server's defaulting + CEL validation, driven by the CRD file -------------------------------------

def _apply_defaults(node: dict, value):
    if isinstance(value, dict) and node.get("properties"):
        for key, child in node["properties"].items():
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                _apply_defaults(child, value[key])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _apply_defaults(node["items"], item)
    return value


def _eval_python(rule, obj):
    env = celpy.Environment()
    return bool(env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(obj)}))


def _eval_rust(rule, obj):
    return bool(rust_cel.evaluate(rule, {"self": obj}))


def _cel_failures(node: dict, value, path: str, evaluate) -> list[str]:
    failures = []
    for rule in node.get("x-kubernetes-validations", []):
        if not evaluate(rule["rule"], value):
            failures.append(path + rule.get("fieldPath", "") + ": " + rule["message"])
    if isinstance(value, dict):
        for key, child in (node.get("properties") or {}).items():
            if key in value:
                failures += _cel_failures(child, value[key], f"{path}.{key}" if path else key, evaluate)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            failures += _cel_failures(node["items"], item, f"{path}[{i}]", evaluate)
    return failures


def server_side_rule_errors(doc: dict, evaluate) -> list[str]:
    schema = _schema(doc["kind"])["properties"]["spec"]
    spec = _apply_defaults(schema, copy.deepcopy(doc["spec"]))
    return _cel_failures(schema, spec, "spec", evaluate)


def _rule_cases():
    """The invalid-manifest cases that only a CEL rule catches (the schema accepts them)."""
    out = []
    for case in CASES:
        kind, patch, path, fragment = case
        doc = valid(kind)
        try:
            for key, value in patch.items():
                _set(doc, key, value)
            parse_resource(doc)
        except InvalidManifest as err:
            if all(e.path and err.errors and not e.message.startswith(("must", "required", "unknown"))
                   for e in err.errors):
                out.append(pytest.param(doc, f"{path}: ", fragment, id=path + ":" + fragment))
    return out


RULE_CASES = _rule_cases()


def test_rule_cases_cover_every_rule_kind():
    assert len(RULE_CASES) >= 15


@pytest.mark.parametrize("evaluate", [_eval_python, _eval_rust], ids=["cel-python", "cel-rust"])
@pytest.mark.parametrize("kind", list(KIND_INFO))
def test_valid_objects_pass_crd_rules(kind, evaluate):
    assert server_side_rule_errors(valid(kind), evaluate) == []


@pytest.mark.parametrize("evaluate", [_eval_python, _eval_rust], ids=["cel-python", "cel-rust"])
@pytest.mark.parametrize("doc,prefix,fragment", RULE_CASES)
def test_invalid_objects_fail_crd_rules_at_the_same_path(doc, prefix, fragment, evaluate):
    failures = server_side_rule_errors(doc, evaluate)
    assert [f for f in failures if f.startswith(prefix) and fragment in f], failures


@pytest.mark.parametrize("evaluate", [_eval_python, _eval_rust], ids=["cel-python", "cel-rust"])
def test_examples_pass_crd_rules(evaluate):
    from branchmerge.api.manifests import load

    result = load([Path(__file__).resolve().parents[2] / "examples"])
    for resource in result.resources:
        doc = resource.wire()
        assert server_side_rule_errors(doc, evaluate) == [], resource.key


def test_committed_api_reference_matches_models():
    from branchmerge.api.reference import render_reference

    path = CRD_DIR.parent / "docs" / "api-reference.md"
    assert path.read_text() == render_reference(), "run `branchmerge crds --out crds --docs docs/api-reference.md`"


@pytest.mark.parametrize("evaluate", [_eval_python, _eval_rust], ids=["cel-python", "cel-rust"])
def test_map_keys_are_checked_by_cel_rules(evaluate):
    """Map key constraints cannot be OpenAPI in a CRD (propertyNames/patternProperties); a CEL rule has them."""
    doc = valid("BranchSFT")
    doc["spec"]["resources"] = {"extraResources": {"rdma/ib": "1", "nvidia.com/hostdev": "8"},
                                "podAnnotations": {"k8s.v1.cni.cncf.io/networks": "ib-sriov"}}
    assert server_side_rule_errors(doc, evaluate) == []
    doc["spec"]["resources"] = {"extraResources": {"rdma ib": "1"}, "podAnnotations": {"a" * 317: "x"}}
    assert server_side_rule_errors(doc, evaluate) == [
        "spec.resources.extraResources: every key must be at most 253 characters long and match "
        "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        "spec.resources.podAnnotations: every key must be at most 316 characters long"]
