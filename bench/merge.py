"""Benchmark the Merge engine against raw I/O and mergekit on a synthetic ~1 GB bf16 model.

    .venv/bin/python bench/merge.py [--workdir /tmp/branchmerge-bench-merge] [--layers 8]
                                    [--mergekit .venv-mergekit/bin/mergekit-yaml] [--scale-check]
                                    [--threads N] [--repeat N] [--smoke]

Builds (once, cached in --workdir) a Llama-shaped base model in bf16 safetensors shards plus two
"fine-tuned" variants (base + small random deltas), then times in this run, each as a subprocess with its
peak RSS sampled (psutil, whole process tree):
  raw      read every input byte once + write one model's bytes (the I/O floor),
  engine   `branchmerge stage merge` for ties and arcee_fusion,
  mergekit `mergekit-yaml` on the same configs when installed (a separate venv: it pins other versions).
Prints ratios (engine / raw, engine / mergekit), the engine's merge loop alone against raw I/O (its start-up --
interpreter, torch and numba imports, spec checks -- is a fixed ~2 s that a larger model amortizes), a lower
bound for engine / raw (start-up + writing the output alone, also measured), and how far the outputs agree
with mergekit's.
--scale-check also merges a model with half the layers: peak RSS should not follow model size.
--smoke: a 2-layer model of a few MB in a fresh temporary folder (removed after), ties only (and mergekit),
--scale-check, one repeat; a mergekit failure is fatal there too. Seconds, so tests/test_bench_smoke.py
notices when the bench stops running; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml

from branchmerge.api import merge_methods as registry

REPO = Path(__file__).resolve().parents[1]
SHARD_BYTES = 400 << 20


# ----------------------------------------------------------------------------------------- synthetic models

def model_shapes(layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_synthetic(folder: Path, shapes: dict, seed: int, base_seed: int | None, hidden: int, layers: int,
                    intermediate: int, vocab: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """Base (base_seed None) or base + 0.002-scale deltas, in ~400 MB shards. Each tensor has its own
    seed, so a variant is drawn tensor by tensor without holding its base: the model never sits in memory."""
    from branchmerge.trainer.tiny import write_model

    if (folder / "config.json").exists():
        return
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)

    def tensors():
        for i, (name, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed((base_seed if base_seed is not None else seed) * 100_003 + i)
            t = torch.randn(shape, generator=g) * 0.02
            if name.endswith("norm.weight"):
                t += 1.0
            if base_seed is not None:
                t += torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + i)) * 0.002
            yield name, t.to(dtype)

    write_model(tmp, tensors(), shard_bytes=SHARD_BYTES, config={
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "hidden_act": "silu"})
    os.replace(tmp, folder)


def build_models(workdir: Path, layers: int, hidden: int, intermediate: int, vocab: int,
                 dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    shapes = model_shapes(layers, hidden, intermediate, vocab)
    suffix = "" if dtype == torch.bfloat16 else "-" + str(dtype).removeprefix("torch.")
    root = workdir / f"models-L{layers}-H{hidden}{suffix}"
    folders = [root / "base", root / "ft1", root / "ft2"]
    for folder, seed, base_seed in zip(folders, (1, 2, 3), (None, 1, 1)):
        write_synthetic(folder, shapes, seed, base_seed, hidden, layers, intermediate, vocab, dtype)
    return folders


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------- measurement

def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, CPU time (user + system of the process and its waited children) and peak RSS (sum over the
    process tree, sampled every 20 ms) of a command. On a shared machine CPU time is the steadier number."""
    cpu_before = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"wall": wall, "cpu": _children_cpu() - cpu_before, "rss": peak, "stdout": stdout}


# Run in a bare interpreter (no torch import) so the floor includes no library start-up cost.
RAW_IO = """
import os, sys
from pathlib import Path
inputs, out, out_bytes = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
buf = bytearray(64 << 20)
view = memoryview(buf)
for folder in inputs:
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
with open(out, "wb", buffering=0) as fh:
    left = out_bytes
    while left > 0:
        n = min(left, len(buf))
        fh.write(view[:n])
        left -= n
    os.fsync(fh.fileno())
os.remove(out)
"""


def python_cmd() -> list[str]:
    return [sys.executable]


def run_raw(inputs: list[Path], out: Path, out_bytes: int) -> dict:
    """The I/O floor: read every input shard once, write one model's bytes to one file (fsync)."""
    return measure([*python_cmd(), "-c", RAW_IO, *map(str, inputs), str(out), str(out_bytes)])


def median_run(repeat: int, run) -> dict:
    """The run with the median wall time of ``repeat`` (a shared machine's outliers are not the result)."""
    runs = sorted((run() for _ in range(repeat)), key=lambda m: m["wall"])
    return runs[len(runs) // 2]


# Bench values of the parameters a method needs (the rest keep their defaults, mergekit's and ours alike).
PER_MODEL = {"weight": (1.0, 0.5), "density": (0.5, 0.5)}
GLOBAL = {"t": 0.5, "selectTopk": 0.5}
NEARSWAP_T = 0.001  # nearswap's t is a distance between weights


def bench_case(method: str, base: Path, ft1: Path, ft2: Path):
    """(base or None, [(model, per-model parameters)], global parameters) for ``method``, from its registry row:
    a base where the row requires one (one of the two models where it must be), the parameters it uses."""
    row = registry.row(method)
    base_ref = ft2 if row.base_in_models else base if row.base == "required" else None
    models = [(ft1, {}), (ft2, {})]
    for name, values in PER_MODEL.items():
        if name in row.parameters:
            for (_, fields), value in zip(models, values):
                fields[name] = value
    params = {n: (NEARSWAP_T if method == "nearswap" and n == "t" else v) for n, v in GLOBAL.items()
              if n in row.parameters}
    return base_ref, models, params


def engine_manifest(method: str, base: Path, ft1: Path, ft2: Path, out: Path) -> dict:
    base_ref, models, params = bench_case(method, base, ft1, ft2)
    spec = {"method": method, "models": [{"uri": m.as_uri(), **f} for m, f in models], "parameters": params,
            "dtype": "float32", "outDtype": "bfloat16", "outShardSize": "2GB", "seed": 0,
            "output": {"uri": out.as_uri()}}
    if base_ref is not None:
        spec["base"] = {"uri": base_ref.as_uri()}
    return {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge",
            "metadata": {"name": "bench-" + method.replace("_", "-")}, "spec": spec}


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def mergekit_config(method: str, base: Path, ft1: Path, ft2: Path) -> dict:
    base_ref, models, params = bench_case(method, base, ft1, ft2)
    config = {"merge_method": method,
              "models": [{"model": str(m), **({"parameters": f} if f else {})} for m, f in models],
              "parameters": {_snake(k): v for k, v in params.items()}, "dtype": "float32", "out_dtype": "bfloat16"}
    if base_ref is not None:
        config["base_model"] = str(base_ref)
    return config


def uses_base(method: str) -> bool:
    row = registry.row(method)
    return row.base == "required" and not row.base_in_models


def agreement(ours: Path, theirs: Path) -> dict:
    """Fraction of equal entries and max |difference| between two merged folders."""
    from safetensors import safe_open

    def tensors(folder: Path):
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    yield k, f

    theirs_where = dict(tensors(theirs))
    equal = total = 0
    worst = 0.0
    for name, f in tensors(ours):
        with safe_open(f, "pt") as a, safe_open(theirs_where[name], "pt") as b:
            x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
        equal += int((x == y).sum())
        total += x.numel()
        worst = max(worst, float((x - y).abs().max()))
    return {"equal": equal / total, "maxAbsDiff": worst}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="models are built once and cached here (default /tmp/branchmerge-bench-merge; "
                         "--smoke: a fresh temporary folder)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--methods", default="all", help="comma-separated, or all (every method of the registry)")
    ap.add_argument("--mergekit", default=str(REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"),
                    help="mergekit-yaml of a separate venv (skipped when missing)")
    ap.add_argument("--model-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="dtype of the synthetic models (float32: no magnitude ties, outputs comparable exactly)")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS for the engine (its number of tensors merged at once) and mergekit")
    ap.add_argument("--scale-check", action="store_true", help="also merge a model with half the layers")
    ap.add_argument("--repeat", type=int, default=1, help="runs of raw and engine each; the median is kept")
    ap.add_argument("--smoke", action="store_true", help="tiny model, ties only: does the bench still run")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.vocab = 2, 256, 512, 1024
        args.methods, args.scale_check, args.repeat = "ties", True, 1
    if args.workdir is None and args.smoke:
        work = Path(tempfile.mkdtemp(prefix="bm-bench-merge-smoke-"))
        try:
            return run(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return run(args, (args.workdir or Path("/tmp/branchmerge-bench-merge")).resolve())


def run(args, work: Path) -> int:
    work.mkdir(parents=True, exist_ok=True)
    failures = []
    t0 = time.time()
    dtype = getattr(torch, args.model_dtype)
    base, ft1, ft2 = build_models(work, args.layers, args.hidden, args.intermediate, args.vocab, dtype)
    size = folder_bytes(base)
    print(f"model: {args.layers} layers, hidden {args.hidden}, {size / 1e9:.2f} GB {args.model_dtype} per model "
          f"(built/cached in {time.time() - t0:.0f} s)")
    # warm the page cache so every runner reads from the same place
    run_raw([base, ft1, ft2], work / "warm.bin", 0)
    # Same threads for every runner; on a shared, oversubscribed machine 1 thread is much faster than
    # OpenMP threads that spin while descheduled.
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    have_mergekit = Path(args.mergekit).exists()
    # writing one model's bytes (+ fsync) with nothing read: no merge can publish its output faster
    write_only = median_run(args.repeat, lambda: run_raw([], work / "raw.bin", size))
    rows = []
    methods = registry.names() if args.methods == "all" else args.methods.split(",")
    for method in methods:
        inputs = [base, ft1, ft2] if uses_base(method) else [ft1, ft2]
        print(f"[{method}] raw I/O ...", flush=True)
        raw = median_run(args.repeat, lambda: run_raw(inputs, work / "raw.bin", size))
        out = work / f"out-{method}"
        spec = work / f"{method}.yaml"
        spec.write_text(yaml.safe_dump(engine_manifest(method, base, ft1, ft2, out)))
        print(f"[{method}] engine ...", flush=True)

        def engine_run() -> dict:
            shutil.rmtree(out, ignore_errors=True)
            run = measure([*python_cmd(), "-m", "branchmerge.cli", "stage", "merge", "--spec", str(spec),
                           "--result", str(work / f"{method}.result.json")], env)
            run["metrics"] = json.loads((work / f"{method}.result.json").read_text())["metrics"]
            return run

        eng = median_run(args.repeat, engine_run)
        metrics = eng["metrics"]
        row = {"method": method, "raw": raw, "engine": eng, "metrics": metrics}
        if have_mergekit:
            mk_out = work / f"mergekit-{method}"
            shutil.rmtree(mk_out, ignore_errors=True)
            cfg = work / f"mergekit-{method}.yaml"
            cfg.write_text(yaml.safe_dump(mergekit_config(method, base, ft1, ft2)))
            print(f"[{method}] mergekit ...", flush=True)
            try:
                row["mergekit"] = measure([args.mergekit, str(cfg), str(mk_out), "--no-copy-tokenizer",
                                           "--no-write-model-card", "--random-seed", "0", "--quiet"], env)
            except RuntimeError as err:  # reported beside our timings, not fatal to the table
                print(f"[{method}] mergekit failed: {str(err)[-300:]}", flush=True)
                failures.append(f"mergekit {method}")
            if any(mk_out.glob("*.safetensors")):  # (a method mergekit lacks or refuses: timings only)
                row["agreement"] = agreement(out, mk_out)
            shutil.rmtree(mk_out, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        rows.append(row)

    print(f"\n{'method':<13} {'runner':<9} {'wall s':>7} {'cpu s':>7} {'peak RSS MB':>12} "
          f"{'wall x raw':>11} {'wall x mk':>10} {'cpu x raw':>10} {'cpu x mk':>9}")
    for row in rows:
        for runner in ("raw", "engine", "mergekit"):
            if runner not in row:
                continue
            m, raw, mk = row[runner], row["raw"], row.get("mergekit")
            ratio = (lambda key, ref: f"{m[key] / ref[key]:.2f}" if ref and ref[key] > 0 else "-")
            print(f"{row['method']:<13} {runner:<9} {m['wall']:>7.1f} {m['cpu']:>7.1f} {m['rss'] / 2**20:>12.0f} "
                  f"{ratio('wall', raw):>11} {ratio('wall', mk):>10} {ratio('cpu', raw):>10} "
                  f"{ratio('cpu', mk):>9}")
        if "agreement" in row:
            a = row["agreement"]
            print(f"{'':<13} agreement with mergekit: {100 * a['equal']:.3f}% entries equal, "
                  f"max |diff| {a['maxAbsDiff']:.3g}")
        loop = row["metrics"]["elapsedSeconds"]
        print(f"{'':<13} engine merge loop (without start-up: interpreter, imports, spec checks): {loop:.1f} s "
              f"= {loop / row['raw']['wall']:.2f}x raw")
        startup = row["engine"]["wall"] - loop
        floor = startup + write_only["wall"]
        print(f"{'':<13} floor: start-up {startup:.1f} s + writing the output alone {write_only['wall']:.1f} s "
              f"= {floor / row['raw']['wall']:.2f}x raw (a merge loop costing nothing but its writes)")
        if "fractionTaken" in row["metrics"]:
            print(f"{'':<13} fractionTaken: {row['metrics']['fractionTaken']}")
    if args.scale_check:  # the same merges on a model with half the layers: peak RSS should not follow size
        half = max(1, args.layers // 2)
        hb, h1, h2 = build_models(work, half, args.hidden, args.intermediate, args.vocab, dtype)
        print()
        for row in rows:
            method = row["method"]
            out = work / "out-half"
            shutil.rmtree(out, ignore_errors=True)
            spec = work / "half.yaml"
            spec.write_text(yaml.safe_dump(engine_manifest(method, hb, h1, h2, out)))
            small = measure([*python_cmd(), "-m", "branchmerge.cli", "stage", "merge", "--spec", str(spec)], env)
            shutil.rmtree(out, ignore_errors=True)
            big = row["engine"]
            print(f"scale check ({method}): {half} layers ({folder_bytes(hb) / 1e9:.2f} GB) peak RSS "
                  f"{small['rss'] / 2**20:.0f} MB, cpu {small['cpu']:.1f} s; {args.layers} layers "
                  f"({size / 1e9:.2f} GB) peak RSS {big['rss'] / 2**20:.0f} MB, cpu {big['cpu']:.1f} s; "
                  f"RSS ratio {big['rss'] / small['rss']:.2f}")
    if failures and args.smoke:  # the full run reports them beside the table; a smoke run must not pass
        print(f"failed: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
