"""The dependency graph: order, cycles named, dangling refs and duplicates found at their field paths."""
import pytest

from branchmerge.api.graph import CycleError, Dag, input_refs, ref_key, references
from branchmerge.api.manifests import load
from branchmerge.api.validation import parse_resource

from .conftest import valid


def _pipeline():
    return [parse_resource(valid(k)) for k in ("Eval", "Merge", "BranchSFT", "TeacherGen")]


def test_order_puts_upstreams_first():
    dag = Dag.build(_pipeline())
    assert dag.order() == ["TeacherGen/traces", "BranchSFT/math", "Merge/merged", "Eval/bench"]
    assert dag.upstreams["Merge/merged"] == ["BranchSFT/math"]
    assert dag.descendants("TeacherGen/traces") == {"BranchSFT/math", "Merge/merged", "Eval/bench"}
    assert dag.ancestors("Eval/bench") == {"TeacherGen/traces", "BranchSFT/math", "Merge/merged"}


def test_references_carry_field_paths():
    merge = parse_resource(valid("Merge"))
    assert [(r.path, r.key) for r in references(merge)] == [("spec.models[0].from", "BranchSFT/math")]


def test_input_refs_walk_nested_refs_and_skip_what_the_stage_writes():
    sft = valid("BranchSFT")
    sft["spec"]["data"][0]["validation"] = {"uri": "file:///data/val.jsonl"}
    sft["spec"]["checkpointing"] = {"uri": "pvc://scratch/ckpt"}
    sft["spec"]["output"] = {"uri": "pvc://models/math"}
    sft["spec"]["resources"] = {"podAnnotations": {"uri": "not-a-ref"}}
    found = [(r.path, r.key, r.upstream) for r in input_refs(sft["spec"])]
    assert found == [("spec.base", "hf://org/student@main", None),
                     ("spec.data[0]", "TeacherGen/traces", ("TeacherGen", "traces")),
                     ("spec.data[0].validation", "file:///data/val.jsonl", None)]
    base = next(iter(input_refs(sft["spec"])))
    assert base.uri == "hf://org/student@main" and base.allow_patterns == ("*.safetensors", "*.json", "tokenizer*")


def test_input_refs_read_a_parsed_spec_as_its_wire_form():
    for kind in ("TeacherGen", "BranchSFT", "Merge", "Eval", "MergeSearch"):
        doc = valid(kind)
        parsed = sorted((r.path, r.key) for r in input_refs(parse_resource(doc).spec))  # model field order
        assert parsed == sorted((r.path, r.key) for r in input_refs(doc["spec"])) and parsed, kind


def test_ref_key_of_either_form():
    merge = parse_resource(valid("Merge"))
    assert ref_key(merge.spec.models[0]) == ref_key({"from": {"kind": "BranchSFT", "name": "math"}}) == "BranchSFT/math"
    assert ref_key(merge.spec.base) == "pvc://models/base"
    assert ref_key(None) is None and ref_key({}) is None


def test_independent_resources_keep_manifest_order():
    a, b = valid("Merge"), valid("Merge")
    a["spec"]["models"][0] = {"uri": "file:///m", "density": 0.5}
    b["metadata"]["name"] = "other"
    b["spec"]["models"][0] = {"uri": "file:///m", "density": 0.5}
    dag = Dag.build([parse_resource(b), parse_resource(a)])
    assert dag.order() == ["Merge/other", "Merge/merged"]


def test_cycle_is_named():
    a, b = valid("Merge"), valid("Merge")
    a["metadata"]["name"], b["metadata"]["name"] = "a", "b"
    a["spec"]["base"] = {"from": {"kind": "Merge", "name": "b"}}
    b["spec"]["base"] = {"from": {"kind": "Merge", "name": "a"}}
    a["spec"]["models"][0] = b["spec"]["models"][0] = {"uri": "file:///m", "density": 0.5}
    dag = Dag.build([parse_resource(a), parse_resource(b)])
    cycle = dag.find_cycle()
    assert cycle[0] == cycle[-1] and set(cycle) == {"Merge/a", "Merge/b"}
    with pytest.raises(CycleError, match=r"Merge/(a|b) -> Merge/(a|b) -> Merge/(a|b)"):
        dag.order()


def test_self_reference_is_a_cycle():
    a = valid("Merge")
    a["spec"]["base"] = {"from": {"kind": "Merge", "name": "merged"}}
    assert Dag.build([parse_resource(a)]).find_cycle() == ["Merge/merged", "Merge/merged"]


def _write(tmp_path, name, docs):
    import yaml
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs))
    return path


def test_set_problems_name_file_document_and_field(tmp_path):
    merge = valid("Merge")
    dup = valid("Merge")
    path = _write(tmp_path, "pipeline.yaml", [merge, dup])
    result = load([path])
    messages = [str(p) for p in result.problems]
    assert f"{path}#1: metadata.name: duplicate Merge/merged (also in {path}#0)" in messages
    assert f"{path}#0: spec.models[0].from: refers to BranchSFT/math, which is not among the manifests" in messages


def test_folder_skips_foreign_yaml_but_named_files_must_be_ours(tmp_path):
    _write(tmp_path, "kustomization.yaml", [{"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}])
    tg = valid("TeacherGen")
    _write(tmp_path, "tg.yaml", [tg])
    assert load([tmp_path]).ok
    assert not load([tmp_path / "kustomization.yaml"]).ok
