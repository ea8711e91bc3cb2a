"""``branchmerge validate`` warns when training data reaches a benchmark without a decontamination gate."""
from __future__ import annotations

import copy

import yaml

from branchmerge.api.decontamination_check import ungated
from branchmerge.api.validation import parse_resource

from tests.conftest import API_VERSION as API
from .test_cli import bm

B1, B2 = "file:///bench/aime24.jsonl", "file:///bench/gpqa.jsonl"
TG = {"apiVersion": API, "kind": "TeacherGen", "metadata": {"name": "traces"},
      "spec": {"teacher": {"model": {"uri": "file:///models/teacher"}},
               "prompts": {"dataset": {"uri": "file:///data/prompts.jsonl"}}}}
SFT = {"apiVersion": API, "kind": "BranchSFT", "metadata": {"name": "math"},
       "spec": {"base": {"uri": "file:///models/student"},
                "data": [{"from": {"kind": "TeacherGen", "name": "traces"}}, {"uri": "file:///data/extra.jsonl"}]}}
EVAL = {"apiVersion": API, "kind": "Eval", "metadata": {"name": "bench"},
        "spec": {"model": {"from": {"kind": "BranchSFT", "name": "math"}},
                 "benchmarks": [{"name": "aime24", "kind": "math", "dataset": {"uri": B1}},
                                {"name": "gpqa", "kind": "mcq", "dataset": {"uri": B2}}]}}


def _docs(tg_gate=None, sft_gate=None, eval_model=None):
    tg, sft, ev = copy.deepcopy(TG), copy.deepcopy(SFT), copy.deepcopy(EVAL)
    if tg_gate:
        tg["spec"]["decontaminate"] = {"benchmarks": [{"uri": u} for u in tg_gate]}
    if sft_gate:
        sft["spec"]["decontaminate"] = {"benchmarks": [{"uri": u} for u in sft_gate]}
    if eval_model:
        ev["spec"]["model"] = eval_model
    return [tg, sft, ev]


def _validate(tmp_path, docs, *flags):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return bm("validate", "-f", str(path), *flags)


def test_no_gate_warns_for_each_training_dataset_and_still_passes(tmp_path):
    out = _validate(tmp_path, _docs())
    assert out.returncode == 0 and "3 manifest(s) valid" in out.stdout
    lines = out.stderr.splitlines()
    assert lines == [
        f"warning: BranchSFT/math spec.data[0] (TeacherGen/traces) is not decontaminated against {B1}, {B2}, "
        f"scored by Eval/bench: list them in BranchSFT/math's spec.decontaminate.benchmarks "
        f"(or TeacherGen/traces's)",
        f"warning: BranchSFT/math spec.data[1] (file:///data/extra.jsonl) is not decontaminated against {B1}, "
        f"{B2}, scored by Eval/bench: list them in BranchSFT/math's spec.decontaminate.benchmarks"]
    assert _validate(tmp_path, _docs(), "-q").stderr == ""  # quiet: errors only


def test_a_teachergen_gate_covers_its_output_and_the_sft_gate_covers_the_rest(tmp_path):
    found = ungated([parse_resource(d) for d in _docs(tg_gate=[B1, B2], sft_gate=[B1])])
    assert [(u.training, u.path, sorted(u.benchmarks)) for u in found] == [("BranchSFT/math", "spec.data[1]", [B2])]
    assert found[0].benchmarks[B2] == {"Eval/bench"}
    out = _validate(tmp_path, _docs(tg_gate=[B1, B2], sft_gate=[B1, B2]))
    assert out.returncode == 0 and out.stderr == ""
    assert ungated([parse_resource(d) for d in _docs(sft_gate=[B2, B1])]) == []


def test_an_eval_of_a_model_not_trained_here_is_not_checked(tmp_path):
    docs = _docs(eval_model={"uri": "hf://org/other-model"})
    assert ungated([parse_resource(d) for d in docs]) == []


def test_the_shipped_quickstart_declares_its_gates():
    out = bm("validate", "-f", "examples/quickstart")
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr, out.stderr
