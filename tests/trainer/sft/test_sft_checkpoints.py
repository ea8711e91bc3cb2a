"""Checkpoint bookkeeping, the checkpoint steps and the precision choice of the SFT stage (no training here)."""
from __future__ import annotations

import json
from types import SimpleNamespace

from branchmerge.api.sft import BranchSFTSpec
from branchmerge.trainer.sft.checkpoint import complete_checkpoints, fingerprint
from branchmerge.trainer.sft.runtime import choose_precision, cpu_has_native_bf16
from branchmerge.trainer.sft.train import _is_checkpoint_step


def test_only_complete_checkpoints_of_the_same_spec_count(tmp_path):
    for step, fp in ((2, "a"), (4, "a"), (6, "b")):
        (tmp_path / f"step-{step}").mkdir()
        (tmp_path / f"step-{step}" / "complete.json").write_text(json.dumps({"step": step, "fingerprint": fp}))
    (tmp_path / "step-8").mkdir()  # killed mid-save: no marker
    assert [s for s, _ in complete_checkpoints(tmp_path, "a")] == [2, 4]


def test_fingerprint_ignores_output_and_checkpointing_but_not_training():
    doc = {"base": {"uri": "file:///m"}, "data": [{"uri": "file:///d"}]}
    a = BranchSFTSpec.model_validate(doc | {"output": {"uri": "file:///o1"}})
    b = BranchSFTSpec.model_validate(doc | {"output": {"uri": "file:///o2"}, "checkpointing": {"everySteps": 5}})
    c = BranchSFTSpec.model_validate(doc | {"training": {"learningRate": 1e-4}})
    assert fingerprint(a, 1) == fingerprint(b, 1) != fingerprint(c, 1)
    assert fingerprint(a, 1) != fingerprint(a, 2)


def test_checkpoint_steps():
    schedule = SimpleNamespace(total_steps=10, steps_by_epoch=[4, 4, 2])
    assert [s for s in range(1, 11) if _is_checkpoint_step(schedule, 3, s)] == [3, 6, 9]
    assert [s for s in range(1, 11) if _is_checkpoint_step(schedule, 0, s)] == [4, 8]  # epoch ends, not the last


def test_precision_falls_back_to_fp32_only_without_native_bf16():
    import torch

    assert choose_precision("fp32") == ("fp32", "")
    if torch.cuda.is_available():
        return
    used, note = choose_precision("bf16")
    if cpu_has_native_bf16():
        assert (used, note) == ("bf16", "")
    else:
        assert used == "fp32" and "no native bf16" in note
    assert choose_precision("fp16")[0] == "fp32"
