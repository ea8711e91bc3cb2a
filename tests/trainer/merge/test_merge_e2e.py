"""The Merge stage as pods and the local runner run it: ``branchmerge stage merge --spec`` in a subprocess.

- TinyR1's chained merge, (Math (+) Science) (+) Code with Arcee Fusion, from the example manifests with
  their ``from:`` refs resolved to folders; the result loads in transformers and generates.
- A merge killed mid-write leaves nothing at the output, and the next run succeeds.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from .merge_models import merge_manifest, read_model, write_manifest

from branchmerge.api.outputs import read_manifest
from branchmerge.trainer.tiny import fine_tuned_copy, perturbed, random_tensors, write_model

REPO = Path(__file__).resolve().parents[3]
CLI = [sys.executable, "-m", "branchmerge.cli"]


def stage(spec: Path, result: Path, **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([*CLI, "stage", "merge", "--spec", str(spec), "--result", str(result)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def resolve_example(doc: dict, uris: dict[tuple[str, str], Path], out: Path) -> dict:
    spec = doc["spec"]
    for ref in [spec["base"], *spec["models"]]:
        origin = ref.pop("from")
        ref["uri"] = uris[(origin["kind"], origin["name"])].resolve().as_uri()
    spec["output"] = {"uri": out.resolve().as_uri()}
    return doc


@pytest.mark.slow  # ~25 s: two stage subprocesses (torch import) + a transformers load
def test_tinyr1_chained_arcee_fusion_through_the_cli(tmp_path, tiny_model):
    math_, science, code = (fine_tuned_copy(tiny_model, tmp_path / name, seed, 0.02)
                            for name, seed in (("math", 1), ("science", 2), ("code", 3)))
    first, second = yaml.safe_load_all((REPO / "examples/tinyr1/02-merge.yaml").read_text())
    mid_dir, final_dir = tmp_path / "math-science", tmp_path / "final"
    uris = {("BranchSFT", "math"): math_, ("BranchSFT", "science"): science, ("BranchSFT", "code"): code,
            ("Merge", "math-science"): mid_dir}
    results = []
    for doc, out in ((first, mid_dir), (second, final_dir)):
        spec = write_manifest(tmp_path / f"{doc['metadata']['name']}.yaml", resolve_example(doc, uris, out))
        result = tmp_path / f"{doc['metadata']['name']}.result.json"
        proc = stage(spec, result)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        results.append(json.loads(result.read_text()))
    for result, out in zip(results, (mid_dir, final_dir)):
        assert result["phase"] == "Succeeded" and result["outputUri"] == out.resolve().as_uri()
        assert result["files"] == read_manifest(out)
        fractions = result["metrics"]["fractionTaken"]
        assert 0 < fractions["models[0]"] < 0.5 < fractions["models[1]"]  # models[1] is the base
    # every entry of the final model is the mid model's or the code expert's (bf16), never a blend
    final, mid, code_w = read_model(final_dir), read_model(mid_dir), read_model(code)
    assert all(t.dtype == torch.bfloat16 for t in final.values())
    for name, t in final.items():
        from_mid, from_code = t == mid[name].bfloat16(), t == code_w[name].bfloat16()
        assert bool((from_mid | from_code).all()), name
    # it is a working model: transformers loads it with the base's tokenizer and chat template
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(final_dir)
    model = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "1 + 1 ="}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == json.loads((final_dir / "config.json").read_text())["vocab_size"]
    assert torch.isfinite(logits).all()


@pytest.mark.slow  # ~25 s: two stage subprocesses
def test_kill_mid_write_leaves_no_output(tmp_path):
    shapes = {f"model.layers.{i}.mlp.weight": (512, 1024) for i in range(24)}
    base = random_tensors(shapes, 0)
    paths = [write_model(tmp_path / "base", base)]
    for seed in (1, 2):
        paths.append(write_model(tmp_path / f"m{seed}", perturbed(base, seed, 0.01)))
    out = tmp_path / "out"
    spec = write_manifest(tmp_path / "m.yaml", merge_manifest("m", "ties", out, paths[1:], base=paths[0],
                                                             parameters={"density": 0.3}, outShardSize="6MB"))
    proc = stage(spec, tmp_path / "r.json", start_new_session=True)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        temps = list(tmp_path.glob(".tmp-out-*/model-*.safetensors"))
        if len(temps) >= 2:  # at least one shard complete and the next one being written
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.communicate(timeout=60)
    assert killed, "the merge finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert list(tmp_path.glob(".tmp-out-*"))  # the half-written temp folder is beside, not at, the output
    proc = stage(spec, tmp_path / "r.json")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert read_manifest(out) is not None and not list(tmp_path.glob(".tmp-out-*"))
    assert set(read_model(out)) == set(base)
