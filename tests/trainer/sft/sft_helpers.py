"""Helpers for the BranchSFT tests: synthetic reasoning data, manifests, and running the stage."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import manifest


def reasoning_records(n: int, seed: int = 0, long_every: int = 0) -> list[dict]:
    """Arithmetic questions with <think> traces; every ``long_every``-th trace is much longer."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        steps = rng.randint(1, 6) * (8 if long_every and i % long_every == 0 else 1)
        think = " ".join(f"{a} + {k} = {a + k}." for k in range(steps))
        out.append({"prompt": f"what is {a} + {b}?",
                    "response": f"<think>{think}</think> The answer is \\boxed{{{a + b}}}."})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def make_spec(folder: Path, model: Path, data: list[Path] | Path, name: str = "branch", **spec_overrides) -> Path:
    """A BranchSFT manifest file in ``folder`` writing to ``folder/out``."""
    data = [data] if isinstance(data, Path) else data
    spec = {
        "base": {"uri": model.resolve().as_uri()},
        "data": [{"uri": p.resolve().as_uri()} for p in data],
        "training": {"epochs": 2, "learningRate": 2e-3, "globalBatchSize": 4, "microBatchSize": 1,
                     "maxSeqLen": 128, "packing": "neat", "warmupRatio": 0.1, "seed": 7,
                     "gradientCheckpointing": True},
        "deepspeed": {"zeroStage": 2},
        "checkpointing": {"everySteps": 0, "keep": 2},
        "output": {"uri": (folder / "out").resolve().as_uri()},
    }
    deep_update(spec, spec_overrides)
    doc = manifest("BranchSFT", name, spec)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def stage_env() -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a lone process must set its own rendezvous
    return env


def stage_command(spec: Path, result: Path, nprocs: int = 1) -> list[str]:
    """The pod's command, under torchrun with ``nprocs`` ranks on this node when asked (a test sets the rank count
    itself; the local runner derives it from the spec's launch profile, operator/local/launch.py)."""
    stage = ["-m", "branchmerge.cli", "stage", "sft", "--spec", str(spec), "--result", str(result)]
    if nprocs == 1:
        return [sys.executable, *stage]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nprocs), *stage]


def kill_after_first_checkpoint(spec: Path, result: Path, checkpoints: Path, timeout: float = 240) -> None:
    """Run the stage in its own process group and SIGKILL the whole group once a checkpoint is complete (or the
    run ended, or ``timeout``): a node lost mid-run."""
    import signal
    import time

    proc = subprocess.Popen(stage_command(spec, result), env=stage_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not list(checkpoints.glob("step-*/complete.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_sft(spec: Path, nprocs: int = 1, timeout: float = 300) -> tuple[int, dict, str]:
    """Run the stage in fresh processes; (exit code, result JSON, combined output)."""
    result = spec.parent / "result.json"
    proc = subprocess.run(stage_command(spec, result, nprocs), env=stage_env(), capture_output=True, text=True,
                          timeout=timeout)
    data = json.loads(result.read_text()) if result.exists() else {}
    return proc.returncode, data, proc.stdout + proc.stderr


REASONING = "2 + 3 = 5, so the sum is 5."
TRACE = f"<think>\n{REASONING}\n</think>\n\nThe answer is \\boxed{{5}}."  # what the engines write
RAW = f"{REASONING}\n</think>\n\nThe answer is \\boxed{{5}}."  # what vLLM generates after R1's prompt


def save_tokenizer(tok, folder: Path, template: str):
    """``tok`` with ``template``, saved and loaded back (as a published base model's tokenizer)."""
    from transformers import AutoTokenizer

    tok.chat_template = template
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)
