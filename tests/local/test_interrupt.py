"""Ctrl-C: the runner stops its children by process group and leaves every status consistent; a rerun resumes."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from branchmerge.operator.local.status_files import StatusFiles
from branchmerge.operator.local.workdir import Workdir
from branchmerge.trainer.tiny import perturbed, random_tensors, write_model

from .conftest import merge, write_manifests


def ready(st: dict) -> dict:
    return next(c for c in st["conditions"] if c["type"] == "Ready")


# "first" must still be merging when Ctrl-C comes: 64 tensors of 1024 x 1024 take ~2 s of arcee_fusion here
# (a merge of the tiny models ends within milliseconds of its start-up)
SLOW_SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (1024, 1024) for i in range(64)}


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("large")
    base = random_tensors(SLOW_SHAPES, 0)
    write_model(root / "a", base)
    write_model(root / "b", perturbed(base, 1, 0.05))
    return {"a": root / "a", "b": root / "b"}


@pytest.mark.slow  # ~40 s on 2 busy cores: two runs of real stages
def test_sigint_marks_running_interrupted_and_rerun_resumes(large, tmp_path):
    folder = write_manifests(tmp_path / "m", [
        merge("first", "arcee_fusion", [large["a"], large["b"]], base=large["b"]),
        merge("second", "linear", ["first", large["b"]]),
    ])
    wd = tmp_path / "wd"
    store = StatusFiles(Workdir.at(wd))
    cmd = [sys.executable, "-m", "branchmerge.cli", "run", "-f", str(folder), "--workdir", str(wd), "--plain"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # until the stage reports merging (past its imports, which may swallow ^C)
        rec = store.load("Merge/first")
        if rec and rec["status"].get("phase") == "Running" and rec["status"]["progress"]["message"] != "starting":
            break
        time.sleep(0.05)
    else:
        proc.kill()
        raise AssertionError("the first stage never started merging")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    first, second = store.load("Merge/first")["status"], store.load("Merge/second")["status"]
    assert first["phase"] == "Failed" and ready(first)["reason"] == "Interrupted"
    assert first["completionTime"] and first["attempts"] == 1
    assert second["phase"] in ("Pending", "Waiting") and ready(second)["reason"] == "Interrupted"
    assert {c["type"]: c["status"] for c in second["conditions"]}["Reconciling"] == "False"
    assert "rerun the same command to resume" in err
    # the child's whole process group is gone: no stage process is left behind
    leftovers = subprocess.run(["pgrep", "-f", str(wd / "runs/merge/first/resolved.yaml")], capture_output=True)
    assert leftovers.returncode == 1, leftovers.stdout
    assert not (wd / "outputs/merge/first/_manifest.json").exists()  # nothing half-published

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    first, second = store.load("Merge/first")["status"], store.load("Merge/second")["status"]
    assert first["phase"] == second["phase"] == "Succeeded"
    assert first["attempts"] == 2 and ready(first)["reason"] == "Succeeded"
