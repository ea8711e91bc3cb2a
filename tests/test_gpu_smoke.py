"""scripts/gpu_smoke.py without running a stage: interpreter discovery, the offline environment probe and its SKIP
reasons, the specs it writes (checked by `branchmerge validate`), and the throughput/MFU arithmetic. Fast (< 10 s)."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_smoke.py"


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_smoke", None)


def plan(tmp_path: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    summary = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--plan", "--workdir", str(tmp_path / "w"), "--json",
                           str(summary), *extra], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    return proc, (json.loads(summary.read_text()) if summary.exists() else {})


def spec(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "w" / "paths" / name / "spec.yaml").read_text())["spec"]


def test_package_folders_match_setup_py(smoke):
    tree = ast.parse((REPO / "setup.py").read_text())
    folders = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "FOLDERS")
    assert smoke.PACKAGE_FOLDERS == folders


def test_gpu_plan_writes_valid_specs_for_every_path(tmp_path):
    proc, doc = plan(tmp_path, "--python", sys.executable)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [p["name"] for p in doc["paths"]]
    assert names == ["teachergen-vllm", "sft-zero2", "sft-zero3", "sft-kd-zero3", "merge-ties", "eval-vllm"]
    assert doc["specsValid"] is True and "6 specs valid" in proc.stdout
    assert doc["probe"]["deep"] is False  # --plan imports none of the heavy packages
    assert doc["probe"]["branchmerge"]["origin"].startswith(str(REPO / "trainer"))  # this checkout, not an install
    for name in names:
        assert any(line.startswith(name) for line in proc.stdout.splitlines())
    out = (tmp_path / "w" / "paths").resolve()
    tg, z2, z3, kd = (spec(tmp_path, n) for n in ("teachergen-vllm", "sft-zero2", "sft-zero3", "sft-kd-zero3"))
    assert tg["teacher"]["engine"]["name"] == "vllm" and tg["teacher"]["engine"]["dtype"] == "bfloat16"
    assert tg["verify"] == {"kind": "math", "answerField": "answer"}
    assert (z2["deepspeed"], z3["deepspeed"], kd["deepspeed"]) == ({"zeroStage": 2}, {"zeroStage": 3}, {"zeroStage": 3})
    assert {z2["training"]["precision"], kd["training"]["precision"]} == {"bf16"}
    assert z2["resources"]["gpusPerNode"] == 1
    assert kd["objective"]["type"] == "kd" and kd["objective"]["teacher"]["uri"] == (out / "sft-zero2" / "out").as_uri()
    merge = spec(tmp_path, "merge-ties")
    assert [m["uri"] for m in merge["models"]] == [(out / n / "out").as_uri() for n in ("sft-zero2", "sft-zero3")]
    assert spec(tmp_path, "eval-vllm")["model"]["uri"] == (out / "merge-ties" / "out").as_uri()
    # the datasets are written by the script itself
    prompts = (tmp_path / "w" / "data" / "prompts.jsonl").read_text().splitlines()
    assert len(prompts) == 512 and set(json.loads(prompts[0])) == {"id", "problem", "answer"}


def test_cpu_plan_uses_the_tiny_model_fp32_and_eager_vllm(tmp_path):
    proc, doc = plan(tmp_path, "--cpu", "--python", sys.executable)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert doc["mode"] == "cpu" and doc["model"]["shape"]["hidden"] == 128 and doc["specsValid"] is True
    assert spec(tmp_path, "sft-zero3")["training"]["precision"] == "fp32"
    assert spec(tmp_path, "eval-vllm")["engine"] == {"name": "vllm", "dtype": "float32", "maxModelLen": 512,
                                                     "enforceEager": True}


def test_missing_packages_make_every_path_skip_with_the_reason(tmp_path):
    bare = tmp_path / "bare-python"  # this interpreter without site-packages: no torch, vllm, pydantic ...
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    proc, doc = plan(tmp_path, env={"BRANCHMERGE_GPU_PYTHON": str(bare)})
    assert proc.returncode == 0, proc.stdout + proc.stderr  # a SKIP is not a failure
    assert doc["pythonChoice"].startswith("BRANCHMERGE_GPU_PYTHON")
    assert {p["status"] for p in doc["paths"]} == {"SKIP"}
    reasons = {p["name"]: p["reason"] for p in doc["paths"]}
    assert "vllm" in reasons["teachergen-vllm"] and "deepspeed" in reasons["sft-zero2"]
    assert reasons["merge-ties"].startswith("missing torch")
    assert "specs not validated: missing yaml, pydantic, celpy" in proc.stdout


def test_explicit_python_must_exist(smoke):
    with pytest.raises(SystemExit, match="not an executable"):
        smoke.find_python(None, env={"BRANCHMERGE_GPU_PYTHON": "/nonexistent/python", "PATH": "/usr/bin"})
    assert smoke.find_python(sys.executable, env={})[0] == sys.executable


def test_skip_reasons_without_vllm_or_cuda(smoke):
    found = {"python": "/x/python", "modules": {m: {"found": m != "vllm"} for mods in smoke.REQUIRES.values()
                                                for m in mods},
             "branchmerge": {"found": True}, "cuda": {"available": False, "torch": "2.13.0+cpu"}}
    gpu = smoke.skip_reasons(found, smoke.GPU)
    assert gpu["teachergen-vllm"].startswith("missing vllm") and gpu["eval-vllm"].startswith("missing vllm")
    assert "no CUDA device" in gpu["sft-zero2"] and "no CUDA device" in gpu["sft-kd-zero3"]
    assert "merge-ties" not in gpu and "setup" not in gpu  # CPU work still runs
    cpu = smoke.skip_reasons(found, smoke.CPU)
    assert set(cpu) == {"teachergen-vllm", "eval-vllm"}


def test_mfu_and_throughput_lines(smoke):
    assert smoke.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert smoke.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert smoke.peak_tflops("NVIDIA H200", None) == 989.0 and smoke.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312
    assert smoke.peak_tflops("NVIDIA L4", None) is None and smoke.peak_tflops("NVIDIA L4", 121.0) == 121.0
    sft = smoke.Outcome("sft-zero2", "OK", metrics={"tokensPerSecond": 100_000.0, "steps": 5, "precision": "bf16"})
    smoke.throughput(sft, 100_000_000, 989.0, "gpu")
    assert sft.numbers["mfu"] == pytest.approx(6e8 * 1e5 / 989e12, abs=1e-4)
    assert "MFU 6.1%" in sft.throughput
    kd = smoke.Outcome("sft-kd-zero3", "OK", metrics={"tokensPerSecond": 100_000.0, "steps": 5})
    smoke.throughput(kd, 100_000_000, 989.0, "gpu")
    assert kd.numbers["mfu"] == pytest.approx(8e8 * 1e5 / 989e12, abs=1e-4)  # + the teacher's forward
    ev = smoke.Outcome("eval-vllm", "OK", metrics={"generatedTokens": 5000, "generationSeconds": 2.0})
    smoke.throughput(ev, None, None, "gpu")
    assert ev.numbers["tokensPerSecond"] == 2500.0 and smoke.line(ev).split()[:2] == ["eval-vllm", "OK"]


def test_flop_params_from_safetensors_headers(smoke, tmp_path):
    def write(path, shapes):
        header = json.dumps({n: {"dtype": "BF16", "shape": s, "data_offsets": [0, 0]} for n, s in shapes.items()})
        path.write_bytes(struct.pack("<Q", len(header)) + header.encode())

    write(tmp_path / "model.safetensors", {"model.embed_tokens.weight": [64, 8], "lm_head.weight": [64, 8],
                                           "model.layers.0.mlp.up_proj.weight": [16, 8]})
    assert smoke.flop_params(tmp_path) == 64 * 8 + 16 * 8  # the untied input embedding is a lookup
    (tmp_path / "model.safetensors").unlink()
    write(tmp_path / "model.safetensors", {"model.embed_tokens.weight": [64, 8]})  # tied: it is the lm_head too
    assert smoke.flop_params(tmp_path) == 64 * 8


def test_summary_goes_to_out_and_a_timed_out_command_is_killed(smoke, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert smoke.summary_path(None) == tmp_path / "out" / "gpu-smoke.json"
    code, seconds = smoke.run_command(["sleep", "30"], dict(os.environ), tmp_path / "log.txt", timeout=1)
    assert code is None and seconds < 10


def test_no_time_left_skips_every_path_without_running_anything(smoke, tmp_path):
    import time

    layout = smoke.Layout(tmp_path)
    outcomes = smoke.run_all(layout, smoke.GPU, list(smoke.PATHS[1:]), "/nonexistent/python", {}, {},
                             deadline=time.monotonic(), peak=None)
    assert [o.status for o in outcomes] == ["SKIP"] * len(smoke.PATHS)
    assert outcomes[0].reason.startswith("time budget spent") and not (tmp_path / "model").exists()
