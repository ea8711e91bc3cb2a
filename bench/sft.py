"""Benchmark the BranchSFT stage: packing utilisation and training throughput vs a plain HF Trainer loop.

    .venv/bin/python bench/sft.py [--workdir /tmp/branchmerge-bench-sft] [--samples 600] [--max-seq-len 1024]
                                  [--skip-throughput] [--smoke]

Synthetic data with a long-tailed length distribution like reasoning traces (many short answers, a few very
long <think> traces: Pareto-distributed, capped at maxSeqLen). On a tiny Qwen2 model, in this one run:
  1. packing utilisation (real tokens / (rows x maxSeqLen)) and compute utilisation (real tokens / tokens in
     padded micro batches) of none, greedy and neat, from the stage's own data pipeline and schedule;
  2. tokens/s (non-pad tokens per second of training loop) of `branchmerge stage sft` (DeepSpeed ZeRO-2,
     1 rank, fp32) with none and neat packing, vs transformers' Trainer on the same model, the same tokenised
     samples and labels, the same global batch, padding each micro batch to its longest sample.
Prints ratios against the Trainer baseline.
  3. start-up: the samples of a rank from the token cache (token_cache.py: digest the inputs, load) vs
     tokenising the data (dataset.build_samples), on --cache-samples records; ratio against tokenising.
(The loss's memory, chunked vs all logits at once, is bench/sft_loss.py.)
--smoke: 16 samples of at most 128 tokens (2 optimizer steps per run), 32 records for the cache, in a fresh
temporary folder (removed after); every part still runs, so tests/test_bench_smoke.py notices when the bench
stops running. Its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")

import yaml  # noqa: E402

GLOBAL_BATCH, MICRO = 8, 2


def long_tailed_records(n: int, max_words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        steps = min(max_words // 8, max(1, int(rng.paretovariate(1.1) * 2)))  # heavy tail of long traces
        think = " ".join(f"{a} + {k} = {a + k}." for k in range(steps))
        records.append({"prompt": f"what is {a} + {b}?", "response": f"<think>{think}</think> \\boxed{{{a + b}}}"})
    return records


def spec_doc(model: Path, data: Path, out: Path, packing: str, max_len: int) -> dict:
    return {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "BranchSFT", "metadata": {"name": f"bench-{packing}"},
            "spec": {"base": {"uri": model.as_uri()}, "data": [{"uri": data.as_uri()}],
                     "training": {"epochs": 1, "learningRate": 1e-3, "globalBatchSize": GLOBAL_BATCH,
                                  "microBatchSize": MICRO, "maxSeqLen": max_len, "packing": packing,
                                  "overLength": "truncate", "gradientCheckpointing": False, "precision": "fp32"},
                     "deepspeed": {"zeroStage": 2}, "output": {"uri": out.as_uri()}}}


def utilisation_table(model: Path, data: Path, max_len: int) -> dict[str, tuple[float, float, int]]:
    from branchmerge.api.sft import BranchSFTSpec
    from branchmerge.api.uris import local_path
    from branchmerge.trainer.sft.dataset import build_samples
    from branchmerge.trainer.sft.engine import load_tokenizer
    from branchmerge.trainer.sft.schedule import make_schedule
    from branchmerge.trainer.sft.train import _utilisation

    out = {}
    tokenizer = None
    samples = None
    for packing in ("none", "greedy", "neat"):
        spec = BranchSFTSpec.model_validate(spec_doc(model, data, Path("/tmp/x"), packing, max_len)["spec"])
        tokenizer = tokenizer or load_tokenizer(model, spec)
        if samples is None:
            samples, stats = build_samples(spec, tokenizer, lambda ref, what: local_path(ref.uri))
            lengths = sorted(len(s.input_ids) for s in samples)
            print(f"samples: {len(samples)}, tokens: {sum(lengths)}, median {lengths[len(lengths) // 2]}, "
                  f"p99 {lengths[int(0.99 * len(lengths))]}, max {lengths[-1]}, truncated {stats.truncated}")
        schedule = make_schedule([len(s.input_ids) for s in samples], spec.training, 1)
        row_fill, compute_fill = _utilisation(schedule, max_len)
        out[packing] = (row_fill, compute_fill, sum(len(r) for r in schedule.rows_by_epoch))
    return out


def stage_throughput(workdir: Path, model: Path, data: Path, packing: str, max_len: int) -> dict:
    folder = workdir / f"stage-{packing}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_doc(model, data, folder / "out", packing, max_len)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "branchmerge.cli", "stage", "sft", "--spec", str(spec),
                           "--result", str(folder / "result.json")], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"stage failed:\n{proc.stderr[-3000:]}")
    return json.loads((folder / "result.json").read_text())["metrics"]


def token_cache_startup(workdir: Path, model: Path, n: int, max_len: int) -> None:
    """Seconds to the samples of one rank: tokenising, the first start (tokenise + write the cache), a later
    start or another rank (digest the inputs, load the cache)."""
    from branchmerge.api.sft import BranchSFTSpec
    from branchmerge.api.uris import local_path
    from branchmerge.trainer.sft import token_cache
    from branchmerge.trainer.sft.dataset import build_samples
    from branchmerge.trainer.sft.engine import load_tokenizer

    data = workdir / "cache-data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in long_tailed_records(n, max_len, seed=1)))
    spec = BranchSFTSpec.model_validate(spec_doc(model, data, workdir / "cache-out", "neat", max_len)["spec"])
    root = workdir / "cache-tokens"
    shutil.rmtree(root, ignore_errors=True)

    def resolve(ref, what):
        return local_path(ref.uri)

    def timed(fn):
        tokenizer = load_tokenizer(model, spec)  # not timed: every start loads it, cache or not
        started = time.perf_counter()
        out = fn(tokenizer)
        return time.perf_counter() - started, out

    build_s, (samples, _) = timed(lambda tok: build_samples(spec, tok, resolve))
    miss_s, (_, _, miss) = timed(lambda tok: token_cache.load_or_build(spec, tok, model, resolve, root))
    hit_s, (cached, _, hit) = timed(lambda tok: token_cache.load_or_build(spec, tok, model, resolve, root))
    assert (miss, hit) == ("miss", "hit") and [s.input_ids for s in cached] == [s.input_ids for s in samples]
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    tokens = sum(len(s.input_ids) for s in samples)
    print(f"{n} records, {len(samples)} samples, {tokens} tokens; cache {size / 2**20:.1f} MiB "
          f"({size / tokens:.1f} B/token)")
    print(f"{'tokenise (no cache)':34} {build_s:8.2f} s  1.00x")
    print(f"{'first start (tokenise + write)':34} {miss_s:8.2f} s  {miss_s / build_s:.2f}x")
    print(f"{'cache hit (digest inputs + load)':34} {hit_s:8.2f} s  {hit_s / build_s:.3f}x")


def trainer_throughput(workdir: Path, model_path: Path, data: Path, max_len: int) -> dict:
    """transformers' Trainer: same samples and labels, micro batches padded to their longest sample."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from branchmerge.api.sft import BranchSFTSpec
    from branchmerge.api.uris import local_path
    from branchmerge.trainer.sft.dataset import build_samples
    from branchmerge.trainer.sft.engine import load_tokenizer

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    spec = BranchSFTSpec.model_validate(spec_doc(model_path, data, Path("/tmp/x"), "none", max_len)["spec"])
    tokenizer = load_tokenizer(model_path, spec)
    samples, _ = build_samples(spec, tokenizer, lambda ref, what: local_path(ref.uri))
    rows = [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]
    pad = tokenizer.pad_token_id
    real_tokens = sum(len(s.input_ids) for s in samples)

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    model.config.use_cache = False
    args = TrainingArguments(output_dir=str(workdir / "hf-trainer"), per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=GLOBAL_BATCH // MICRO, num_train_epochs=1,
                             learning_rate=1e-3, lr_scheduler_type="constant_with_warmup", warmup_steps=0,
                             weight_decay=0.01, adam_beta2=0.95, max_grad_norm=1.0, use_cpu=True,
                             report_to="none", save_strategy="no", logging_steps=10 ** 6,
                             dataloader_num_workers=0, remove_unused_columns=False, seed=42, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    started = time.time()
    out = trainer.train()
    seconds = time.time() - started
    return {"tokensPerSecond": real_tokens / seconds, "trainSeconds": seconds, "finalLoss": out.training_loss,
            "steps": out.global_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="default /tmp/branchmerge-bench-sft (the model is kept); --smoke: a fresh temporary "
                             "folder")
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--cache-samples", type=int, default=5000, help="records for the token-cache timing")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes: does the bench still run")
    a = parser.parse_args()
    if a.smoke:
        a.samples, a.max_seq_len, a.cache_samples = 16, 128, 32
    if a.workdir is None and a.smoke:
        a.workdir = Path(tempfile.mkdtemp(prefix="bm-bench-sft-smoke-"))
        try:
            run(a)
        finally:
            shutil.rmtree(a.workdir, ignore_errors=True)
        return
    a.workdir = a.workdir or Path("/tmp/branchmerge-bench-sft")
    run(a)


def run(a) -> None:
    from branchmerge.trainer.tiny import build_tiny_model

    a.workdir.mkdir(parents=True, exist_ok=True)
    model = a.workdir / "model"
    if not (model / "config.json").exists():
        build_tiny_model(model, max_position_embeddings=max(4096, a.max_seq_len))
    data = a.workdir / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in long_tailed_records(a.samples, a.max_seq_len)))

    print(f"== packing utilisation (maxSeqLen {a.max_seq_len}, micro batch {MICRO})")
    table = utilisation_table(model, data, a.max_seq_len)
    print(f"{'packing':8} {'rows':>6} {'row fill':>9} {'compute fill':>13}")
    for packing, (row_fill, compute_fill, rows) in table.items():
        print(f"{packing:8} {rows:6d} {row_fill:9.2%} {compute_fill:13.2%}")
    print(f"neat row fill goal >= 98%: {'met' if table['neat'][0] >= 0.98 else 'NOT met'}")
    print(f"== start-up: samples from the token cache vs tokenising (maxSeqLen {a.max_seq_len})")
    token_cache_startup(a.workdir, model, a.cache_samples, a.max_seq_len)
    if a.skip_throughput:
        return

    print(f"== throughput (tiny Qwen2, 1 process, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, fp32, "
          f"global batch {GLOBAL_BATCH}, micro {MICRO}, 1 epoch)")
    baseline = trainer_throughput(a.workdir, model, data, a.max_seq_len)
    print(f"{'HF Trainer (pad per micro batch)':34} {baseline['tokensPerSecond']:9.0f} tok/s  1.00x  "
          f"({baseline['steps']} steps, {baseline['trainSeconds']:.1f} s)")
    for packing in ("none", "neat"):
        m = stage_throughput(a.workdir, model, data, packing, a.max_seq_len)
        ratio = m["tokensPerSecond"] / baseline["tokensPerSecond"]
        print(f"{'branchmerge stage sft, ' + packing:34} {m['tokensPerSecond']:9.0f} tok/s  {ratio:.2f}x  "
              f"({m['steps']} steps, loss {m['initialLoss']:.3f} -> {m['finalLoss']:.3f}, wall {m['wallSeconds']:.0f} s)")


if __name__ == "__main__":
    main()
