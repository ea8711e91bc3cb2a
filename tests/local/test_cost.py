"""status.cost of the local runner: measured from the stage's process tree, summed over attempts."""
from __future__ import annotations

import io
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from branchmerge.api.common import Status
from branchmerge.api.manifests import load
from branchmerge.operator.local import runner as runner_mod
from branchmerge.operator.local.display import PlainDisplay
from branchmerge.operator.local.runner import RunOptions, Runner
from branchmerge.operator.local.status_files import StatusFiles
from branchmerge.operator.local.workdir import Workdir

from .conftest import merge, write_manifests

BURN, SLEEP = 0.6, 0.8

# A stand-in for a torchrun launcher: two "ranks" burn CPU as children of the launcher; the stage's own
# report (what rank 0 measures of itself) says almost nothing, as rank 0 under torchrun cannot see its
# siblings. It fails retryably (exit 3) so the runner retries once.
FAKE = textwrap.dedent(f"""
    import json, subprocess, sys, time
    burn = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < {BURN}: pass"
    ranks = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
    for r in ranks:
        r.wait()
    time.sleep({SLEEP})
    cost = {{"wallSeconds": 0.01, "cpuSeconds": 0.01, "peakMemoryBytes": 1024, "gpus": 0, "gpuSeconds": 0}}
    json.dump({{"phase": "Failed", "error": "boom", "exitCode": 3, "cost": cost}}, open(sys.argv[1], "w"))
    sys.exit(3)
""")


def _run(folder: Path, workdir: Path) -> tuple[int, str]:
    out = io.StringIO()
    code = Runner(load([folder]), Workdir.at(workdir), RunOptions(), PlainDisplay(out, interval=0)).run()
    return code, out.getvalue()


def test_cost_covers_every_rank_and_every_attempt(models, tmp_path, monkeypatch):
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE)
    monkeypatch.setattr(runner_mod, "stage_command",
                        lambda resource, spec, result, ranks: ([sys.executable, str(script), str(result)], 1))
    doc = merge("m", "linear", [models["m1"], models["m2"]])
    doc["spec"]["runPolicy"] = {"backoffLimit": 1, "backoffSeconds": 0}
    folder = write_manifests(tmp_path / "m", [doc])
    began = time.monotonic()
    code, log = _run(folder, tmp_path / "wd")
    elapsed = time.monotonic() - began
    assert code == 1, log
    status = StatusFiles(Workdir.at(tmp_path / "wd")).load("Merge/m")["status"]
    assert status["attempts"] == 2
    cost = status["cost"]
    Status.model_validate(status)  # what the CRD schema accepts
    assert cost["attempts"] == 2
    # each attempt slept SLEEP and its ranks ran BURN of CPU each: both attempts are in the sums
    assert 2 * SLEEP <= cost["wallSeconds"] <= elapsed
    assert cost["cpuSeconds"] >= 2 * 2 * BURN * 0.95, cost  # the launcher's children, not rank 0's 0.01
    assert cost["cpuSeconds"] <= elapsed * 2 + 1  # 2 cores at most
    assert cost["peakMemoryBytes"] > 5 * 2**20  # a Python interpreter, not the 1 KiB the stage claimed
    assert cost["gpus"] == 0 and cost["gpuSeconds"] == 0


def test_a_real_stage_reports_its_cost(models, tmp_path):
    folder = write_manifests(tmp_path / "m", [merge("soup", "linear", [models["m1"], models["m2"]])])
    began = time.monotonic()
    code, log = _run(folder, tmp_path / "wd")
    elapsed = time.monotonic() - began
    assert code == 0, log
    wd = Workdir.at(tmp_path / "wd")
    result = json.loads(wd.result_file("Merge/soup").read_text())
    own = result["cost"]  # measured by the stage process itself
    assert set(own) == {"wallSeconds", "cpuSeconds", "peakMemoryBytes", "gpus", "gpuSeconds"}
    assert own["wallSeconds"] == result["wallSeconds"] and own["gpus"] == 0 and own["gpuSeconds"] == 0
    assert own["cpuSeconds"] > 0.1 and own["peakMemoryBytes"] > 50 * 2**20  # torch is loaded
    status = StatusFiles(wd).load("Merge/soup")["status"]
    cost = status["cost"]
    Status.model_validate(status)
    # the runner's wall runs from launch to exit: it includes the interpreter start the stage cannot see
    assert own["wallSeconds"] <= cost["wallSeconds"] <= elapsed
    assert cost["cpuSeconds"] >= own["cpuSeconds"] and cost["peakMemoryBytes"] >= own["peakMemoryBytes"]
    assert cost["gpus"] == 0 and cost["gpuSeconds"] == 0 and cost["attempts"] == 1


@pytest.mark.slow  # ~45 s: two DeepSpeed ranks under torchrun
def test_two_rank_sft_counts_both_ranks(tmp_path):
    """Under torchrun, rank 0 (which writes the result) cannot see rank 1, its sibling: the runner's wait4 on
    the launcher does. Both ranks do the same data-parallel work, so the whole must be well above rank 0's."""
    import yaml

    from branchmerge.trainer.tiny import build_tiny_model

    build_tiny_model(tmp_path / "models" / "base")
    records = [{"prompt": f"what is {a} + {b}?", "response": f"<think>{a} + {b} = {a + b}.</think> "
                f"The answer is \\boxed{{{a + b}}}."} for a in range(4) for b in range(4)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "BranchSFT", "metadata": {"name": "two-ranks"},
           "spec": {"base": {"uri": (tmp_path / "models" / "base").as_uri()},
                    "data": [{"uri": (tmp_path / "data" / "train.jsonl").as_uri()}],
                    "training": {"epochs": 1, "learningRate": 2e-3, "globalBatchSize": 4, "microBatchSize": 1,
                                 "maxSeqLen": 256, "packing": "neat", "seed": 7, "precision": "fp32"},
                    "deepspeed": {"zeroStage": 2}, "resources": {"nodes": 2}, "runPolicy": {"backoffLimit": 0}}}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stage.yaml").write_text(yaml.safe_dump(doc))
    code, log = _run(tmp_path / "m", tmp_path / "wd")
    assert code == 0, log
    wd = Workdir.at(tmp_path / "wd")
    rank0 = json.loads(wd.result_file("BranchSFT/two-ranks").read_text())["cost"]
    record = StatusFiles(wd).load("BranchSFT/two-ranks")
    assert record["metadata"]["annotations"].get("local.branchmerge.dev/ranks") == "2"
    cost = record["status"]["cost"]
    assert cost["cpuSeconds"] >= 1.5 * rank0["cpuSeconds"], (cost, rank0)
    assert cost["wallSeconds"] >= rank0["wallSeconds"] and cost["gpus"] == 0
