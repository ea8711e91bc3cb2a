"""Multi-rank launch command, exit judgement, checkpoint bookkeeping and precision choice (no training here)."""
from __future__ import annotations

import json
import signal
import sys
from types import SimpleNamespace

from branchmerge.api.outputs import combined_digest, read_manifest
from branchmerge.api.sft import BranchSFTSpec
from branchmerge.trainer.publish import atomic_folder
from branchmerge.trainer.sft.checkpoint import complete_checkpoints, fingerprint
from branchmerge.trainer.sft.launch import launch_command, succeeded
from branchmerge.trainer.sft.runtime import choose_precision, cpu_has_native_bf16
from branchmerge.trainer.sft.train import _is_checkpoint_step


def test_launch_command_is_torchrun_standalone():
    cmd = launch_command("/x/spec.yaml", "/x/result.json", 4)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:6] == ["--standalone", "--nproc-per-node", "4"]
    assert cmd[6:] == ["-m", "branchmerge.cli", "stage", "sft", "--spec", "/x/spec.yaml", "--result", "/x/result.json"]


def test_success_is_judged_by_the_result_file_and_the_published_output(tmp_path):
    result = tmp_path / "r.json"
    assert not succeeded(0, result)  # no result: not a success even with exit 0
    result.write_text(json.dumps({"phase": "Succeeded"}))
    assert succeeded(0, result) and not succeeded(-signal.SIGABRT, result)  # an abort needs the output to vouch
    with atomic_folder(tmp_path / "out") as folder:
        (folder / "model.safetensors").write_bytes(b"weights")
    published = {"phase": "Succeeded", "outputUri": (tmp_path / "out").as_uri(),
                 "digest": combined_digest(read_manifest(tmp_path / "out"))}
    result.write_text(json.dumps(published))
    assert succeeded(-signal.SIGABRT, result) and succeeded(1, result)  # a rank aborting after publishing
    result.write_text(json.dumps({**published, "digest": "sha256:other"}))
    assert not succeeded(1, result)  # the output is not the one the result reports
    result.write_text(json.dumps({**published, "phase": "Failed"}))
    assert not succeeded(0, result) and not succeeded(2, result)


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
