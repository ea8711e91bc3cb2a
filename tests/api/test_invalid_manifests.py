"""A table of invalid manifests: each is rejected, and the first error names the expected field path."""
import re

import pytest

from branchmerge.api.validation import InvalidManifest, parse_resource

from .conftest import valid

DELETE = object()


def _set(doc, path, value):
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    holder = doc
    for part in parts[:-1]:
        holder = holder[part]
    if value is DELETE:
        del holder[parts[-1]]
    else:
        holder[parts[-1]] = value


# (kind, {path: value}, expected error path, message fragment)
CASES = [
    # envelope
    ("Merge", {"apiVersion": "branchmerge.dev/v1"}, "apiVersion", "must be branchmerge.dev/v1alpha1"),
    ("Merge", {"kind": "Mege"}, "kind", "must be one of"),
    ("Merge", {"metadata.name": "Bad_Name"}, "metadata.name", "must match"),
    ("Merge", {"metadata": DELETE}, "metadata", "required"),
    ("Merge", {"spec": DELETE}, "spec", "required"),
    ("Merge", {"spec.typo": 1}, "spec.typo", "unknown field"),
    # references
    ("Merge", {"spec.base": {}}, "spec.base", "exactly one of uri or from"),
    ("Merge", {"spec.base.from": {"kind": "BranchSFT", "name": "a"}}, "spec.base", "exactly one of uri or from"),
    ("Merge", {"spec.base.uri": "http://example.com/model"}, "spec.base.uri", "must match"),
    ("Merge", {"spec.base.uri": "file://relative/path"}, "spec.base.uri", "must match"),
    ("Merge", {"spec.base.allowPatterns": ["*.safetensors"]}, "spec.base.allowPatterns", "needs an hf:// uri"),
    ("BranchSFT", {"spec.data[0].allowPatterns": ["data/*"]}, "spec.data[0].allowPatterns", "needs an hf:// uri"),
    ("BranchSFT", {"spec.base.allowPatterns": ["/abs/*"]}, "spec.base.allowPatterns[0]", "must match"),
    ("BranchSFT", {"spec.base.allowPatterns": []}, "spec.base.allowPatterns", "at least 1"),
    ("Merge", {"spec.models[0].from.kind": "TeacherGen"}, "spec.models[0].from.kind", "must be one of"),
    ("Merge", {"spec.models[0].from.name": "UPPER"}, "spec.models[0].from.name", "must match"),
    ("BranchSFT", {"spec.data[0].from.kind": "Merge"}, "spec.data[0].from.kind", "must be one of"),
    ("Eval", {"spec.model.from.kind": "Eval"}, "spec.model.from.kind", "must be one of"),
    # merge methods
    ("Merge", {"spec.method": "frankenmerge"}, "spec.method", "must be one of"),
    ("Merge", {"spec.models[1].weight": 0}, "spec.models[1].weight", "must be > 0"),
    ("Merge", {"spec.models[1].weight": -1}, "spec.models[1].weight", "must be > 0"),
    ("Merge", {"spec.models[0].density": 0}, "spec.models[0].density", "must be > 0"),
    ("Merge", {"spec.models[0].density": 1.5}, "spec.models[0].density", "must be <= 1"),
    ("Merge", {"spec.models[0].density": DELETE}, "spec.models", "need a density"),
    ("Merge", {"spec.method": "dare_ties", "spec.models[1].density": DELETE}, "spec.models", "need a density"),
    ("Merge", {"spec.method": "dare_linear", "spec.models[0].density": DELETE, "spec.models[1].density": DELETE},
     "spec.models", "need a density"),
    ("Merge", {"spec.base": DELETE}, "spec.base", "needs a base"),
    ("Merge", {"spec.method": "task_arithmetic", "spec.base": DELETE}, "spec.base", "needs a base"),
    ("Merge", {"spec.method": "slerp"}, "spec.models", "slerp needs exactly 2 models and parameters.t"),
    ("Merge", {"spec.method": "slerp", "spec.parameters": {"t": 0.5}, "spec.models": [{"uri": "file:///a"}]},
     "spec.models", "slerp needs exactly 2"),
    ("Merge", {"spec.method": "slerp", "spec.parameters": {"t": 1.5}}, "spec.parameters.t", "must be <= 1"),
    ("Merge", {"spec.method": "arcee_fusion", "spec.models": [{"uri": "file:///a"}, {"uri": "file:///b"},
                                                              {"uri": "file:///c"}]},
     "spec.models", "exactly 2 models"),
    ("Merge", {"spec.method": "arcee_fusion"}, "spec.base", "base that is one of the 2 models"),
    ("Merge", {"spec.method": "arcee_fusion", "spec.base": DELETE}, "spec.base", "needs a base"),
    ("Merge", {"spec.method": "model_stock", "spec.models": [{"uri": "file:///a"}]}, "spec.models", "at least 2"),
    ("Merge", {"spec.models": []}, "spec.models", "at least 1"),
    ("Merge", {"spec.parameters": {"lambda": -1}}, "spec.parameters.lambda", "must be >= 0"),
    ("Merge", {"spec.parameters": {"epsilonn": 0.1}}, "spec.parameters.epsilonn", "unknown field"),
    # rules generated from the method registry
    ("Merge", {"spec.parameters": {"epsilon": 0.1}}, "spec.parameters.epsilon", "unknown parameter for this method"),
    ("Merge", {"spec.parameters": {"selectTopk": 0.5}}, "spec.parameters.selectTopk", "unknown parameter"),
    ("Merge", {"spec.parameters": {"gamma": 1}}, "spec.parameters.gamma", "must be < 1"),
    ("Merge", {"spec.parameters": {"maxIter": 0}}, "spec.parameters.maxIter", "must be >= 1"),
    ("Merge", {"spec.method": "linear", "spec.models": [{"uri": "file:///a"}] * 2, "spec.parameters": {"t": 0.5}},
     "spec.parameters.t", "only for slerp"),
    ("Merge", {"spec.parameters": {"overrides": [{"t": 0.3}]}}, "spec.parameters.overrides[0].tensors", "required"),
    ("Merge", {"spec.dtype": "int8"}, "spec.dtype", "must be one of"),
    ("Merge", {"spec.outShardSize": "lots"}, "spec.outShardSize", "must match"),
    # sft
    ("BranchSFT", {"spec.data": []}, "spec.data", "at least 1"),
    ("BranchSFT", {"spec.data[0].weight": 0}, "spec.data[0].weight", "must be > 0"),
    ("BranchSFT", {"spec.training.globalBatchSize": 9}, "spec.training.globalBatchSize", "multiple of microBatchSize x"),
    ("BranchSFT", {"spec.resources": {"nodes": 3}}, "spec.training.globalBatchSize", "microBatchSize x nodes"),
    ("BranchSFT", {"spec.training.learningRate": 0}, "spec.training.learningRate", "must be > 0"),
    ("BranchSFT", {"spec.training.warmupRatio": 1}, "spec.training.warmupRatio", "must be < 1"),
    ("BranchSFT", {"spec.training.packing": "tight"}, "spec.training.packing", "must be one of"),
    ("BranchSFT", {"spec.training.scheduler": "step"}, "spec.training.scheduler", "must be one of"),
    ("BranchSFT", {"spec.training.adamBetas": [0.9]}, "spec.training.adamBetas", "at least 2"),
    ("BranchSFT", {"spec.objective": {"type": "kd"}}, "spec.objective.teacher", "needs a teacher"),
    ("BranchSFT", {"spec.objective": {"teacher": {"uri": "file:///t"}}}, "spec.objective.teacher", "only used by"),
    ("BranchSFT", {"spec.objective": {"type": "kd", "teacher": {"uri": "file:///t"}, "divergence": "kl"}},
     "spec.objective.divergence", "must be one of"),
    ("BranchSFT", {"spec.objective": {"type": "kd", "teacher": {"uri": "file:///t"}, "jsdBeta": 1}},
     "spec.objective.jsdBeta", "must be < 1"),
    ("BranchSFT", {"spec.deepspeed": {"zeroStage": 2, "offloadParams": "cpu"}}, "spec.deepspeed.offloadParams",
     "needs zeroStage 3"),
    ("BranchSFT", {"spec.deepspeed": {"zeroStage": 4}}, "spec.deepspeed.zeroStage", "must be one of"),
    ("BranchSFT", {"spec.domain": "Math!"}, "spec.domain", "must match"),
    # resources and run policy
    ("BranchSFT", {"spec.resources": {"nodes": 0}}, "spec.resources.nodes", "must be >= 1"),
    ("BranchSFT", {"spec.resources": {"gpusPerNode": -1}}, "spec.resources.gpusPerNode", "must be >= 0"),
    ("BranchSFT", {"spec.resources": {"memory": "lots"}}, "spec.resources.memory", "must match"),
    ("BranchSFT", {"spec.resources": {"env": [{"name": "K"}]}}, "spec.resources.env[0]", "exactly one of value"),
    ("BranchSFT", {"spec.resources": {"env": [{"name": "1BAD", "value": "x"}]}}, "spec.resources.env[0].name",
     "must match"),
    ("BranchSFT", {"spec.checkpointing": {"uri": "hf://org/ckpt"}}, "spec.checkpointing.uri", "writable location"),
    ("BranchSFT", {"spec.resources": {"tolerations": [{"operator": "Maybe"}]}},
     "spec.resources.tolerations[0].operator", "must be one of"),
    ("BranchSFT", {"spec.runPolicy": {"backoffLimit": -1}}, "spec.runPolicy.backoffLimit", "must be >= 0"),
    # teachergen
    ("TeacherGen", {"spec.teacher.model": DELETE}, "spec.teacher.model", "model is required unless"),
    ("TeacherGen", {"spec.teacher.engine": {"name": "openai"}}, "spec.teacher.engine.endpoint", "needs an endpoint"),
    ("TeacherGen", {"spec.teacher.engine": {"name": "openai", "endpoint": {"baseUrl": "ftp://x", "model": "m"}}},
     "spec.teacher.engine.endpoint.baseUrl", "must match"),
    ("TeacherGen", {"spec.teacher.engine": {"name": "openai", "endpoint": {"baseUrl": "http://x/v1", "model": "m",
                                                                           "apiKey": "sk-secret"}}},
     "spec.teacher.engine.endpoint.apiKey", "unknown field"),
    ("TeacherGen", {"spec.verify": {"kind": "none"}}, "spec.select.mode", "needs a verify.kind"),
    ("TeacherGen", {"spec.verify.answerField": DELETE}, "spec.verify.answerField", "need answerField"),
    ("TeacherGen", {"spec.verify": {"kind": "code"}}, "spec.verify.testsField", "needs testsField"),
    ("TeacherGen", {"spec.sampling": {"samplesPerPrompt": 0}}, "spec.sampling.samplesPerPrompt", "must be >= 1"),
    # decontamination gate
    ("TeacherGen", {"spec.decontaminate": {"benchmarks": []}}, "spec.decontaminate.benchmarks", "at least 1"),
    ("TeacherGen", {"spec.decontaminate": {"benchmarks": [{}]}}, "spec.decontaminate.benchmarks[0]",
     "exactly one of uri or from"),
    ("TeacherGen", {"spec.decontaminate": {"ngram": 8}}, "spec.decontaminate.benchmarks", "required"),
    ("BranchSFT", {"spec.decontaminate": {"benchmarks": [{"uri": "file:///b.jsonl"}], "ngram": 2}},
     "spec.decontaminate.ngram", "must be >= 3"),
    ("BranchSFT", {"spec.decontaminate": {"benchmarks": [{"uri": "file:///b.jsonl"}], "nearDuplicate": 0}},
     "spec.decontaminate.nearDuplicate", "must be > 0"),
    ("BranchSFT", {"spec.decontaminate": {"benchmarks": [{"from": {"kind": "Eval", "name": "bench"}}]}},
     "spec.decontaminate.benchmarks[0].from.kind", "must be one of"),
    ("BranchSFT", {"spec.decontaminate": {"benchmarks": [{"uri": "file:///b.jsonl"}], "questionFields": []}},
     "spec.decontaminate.questionFields", "at least 1"),
    ("TeacherGen", {"spec.sampling": {"topP": 0}}, "spec.sampling.topP", "must be > 0"),
    ("TeacherGen", {"spec.shards": 0}, "spec.shards", "must be >= 1"),
    ("TeacherGen", {"spec.prompts.dataset": {"from": {"kind": "BranchSFT", "name": "x"}}},
     "spec.prompts.dataset.from.kind", "must be one of"),
    ("TeacherGen", {"spec.teacher.engine": {"gpuMemoryUtilization": 1.5}}, "spec.teacher.engine.gpuMemoryUtilization",
     "must be <= 1"),
    # eval
    ("Eval", {"spec.benchmarks": []}, "spec.benchmarks", "at least 1"),
    ("Eval", {"spec.benchmarks[0].kind": "essay"}, "spec.benchmarks[0].kind", "must be one of"),
    ("Eval", {"spec.benchmarks[0].samples": 0}, "spec.benchmarks[0].samples", "must be >= 1"),
    ("Eval", {"spec.benchmarks[0].dataset": DELETE}, "spec.benchmarks[0].dataset", "required"),
    ("Eval", {"spec.model": DELETE}, "spec.model", "model is required unless"),
    ("Eval", {"spec.sampling": {"temperature": -0.1}}, "spec.sampling.temperature", "must be >= 0"),
]


def _case_id(case):
    kind, patch, path, _ = case
    return f"{kind}:{path}:{'+'.join(patch)}"


def test_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_invalid_manifest_is_rejected_at_its_field(case):
    kind, patch, path, fragment = case
    doc = valid(kind)
    for key, value in patch.items():
        _set(doc, key, value)
    with pytest.raises(InvalidManifest) as info:
        parse_resource(doc)
    errors = info.value.errors
    assert [e.path for e in errors if fragment in e.message] == [path], [str(e) for e in errors]


def test_duplicate_benchmark_names_rejected():
    doc = valid("Eval")
    doc["spec"]["benchmarks"].append(dict(doc["spec"]["benchmarks"][0]))
    with pytest.raises(InvalidManifest) as info:
        parse_resource(doc)
    assert [str(e) for e in info.value.errors] == ["spec.benchmarks: benchmark names must be unique"]


@pytest.mark.parametrize("kind", ["TeacherGen", "BranchSFT", "Merge", "Eval"])
def test_base_manifests_are_valid(kind):
    assert parse_resource(valid(kind)).kind == kind


def test_every_error_is_reported_not_just_the_first():
    doc = valid("Merge")
    doc["spec"]["models"][0]["weight"] = -1
    doc["spec"]["models"][1]["density"] = 7
    doc["spec"]["dtype"] = "int4"
    with pytest.raises(InvalidManifest) as info:
        parse_resource(doc)
    assert {e.path for e in info.value.errors} == {"spec.models[0].weight", "spec.models[1].density", "spec.dtype"}
