"""Benchmark the memory of the SFT loss: all logits at once (before) vs chunked_loss (hidden states, a chunk of
positions per lm_head call, each chunk checkpointed).

    .venv/bin/python bench/sft_loss.py [--seq 2048] [--kd-seq 1024] [--vocab 152064] [--hidden 64]
                                       [--chunk 128 256 1024] [--dtype fp32 bf16] [--kd forward-kl]
                                       (--kd also takes taid, sinkhorn (batch-wise form), sinkhorn-token)

Qwen's vocabulary (152064) and a CPU-sized sequence with a small hidden size: the loss's memory is positions x
vocab, the rest of the model does not matter here. Each measurement runs in a fresh process: the peak resident
set (getrusage maxrss; tracemalloc does not see tensor memory) of one forward + backward of the loss, minus the
resident set just before it (inputs, head weights and torch itself). On a GPU the same script reports
torch.cuda.max_memory_allocated instead. Ratios are against the unchunked loss of the same run; the loss values
and a gradient checksum show both computed the same thing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kd_of(name: str):
    """The KD term a --kd name stands for: a divergence, or sinkhorn-token for Sinkhorn's per-token form."""
    from branchmerge.trainer.sft.chunked_loss import KD

    if name == "sinkhorn-token":
        return KD("sinkhorn", sinkhorn_form="token")
    return KD(name, taid_t=0.4)


def measure(seq: int, vocab: int, hidden: int, chunk: int, dtype: str, kd: str | None) -> dict:
    """One loss forward + backward in this process; chunk 0 = unchunked."""
    import torch

    from branchmerge.trainer.sft.chunked_loss import chunk_count, loss_sums
    from branchmerge.trainer.sft.losses import divergence, token_cross_entropy

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)  # the heads' initialisation
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device, dt)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False).to(device, dt).requires_grad_(False)
    h = torch.randn(1, seq, hidden, generator=gen).to(device, dt).requires_grad_(True)
    th = torch.randn(1, seq, hidden, generator=gen).to(device, dt)
    targets = torch.randint(vocab, (1, seq), generator=gen).to(device)
    targets[:, : seq // 10] = -100  # a prompt
    kd_spec = kd_of(kd) if kd else None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    started = time.perf_counter()
    if chunk == 0:  # what train_step did before: every position's logits, upcast at once
        logits = head(h)
        ce = token_cross_entropy(logits, targets).sum()
        kd_sum = torch.zeros((), device=device)
        if kd_spec:
            with torch.no_grad():
                teacher_logits = teacher_head(th)
            per_token = divergence(logits, teacher_logits, kd_spec.kind, taid_t=kd_spec.taid_t, mask=targets != -100,
                                   sinkhorn_form=kd_spec.sinkhorn_form, sinkhorn_group=kd_spec.sinkhorn_group)
            kd_sum = torch.where(targets != -100, per_token, torch.zeros_like(per_token)).sum()
    else:
        ce, kd_sum = loss_sums(h, head, targets, chunks=chunk_count(seq, chunk), kd=kd_spec,
                               teacher_hidden=th if kd_spec else None, teacher_head=teacher_head if kd_spec else None)
    (ce + kd_sum).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"peak": peak, "seconds": time.perf_counter() - started, "ce": ce.item(), "kd": kd_sum.item(),
            "grad": h.grad.double().abs().sum().item() + head.weight.grad.double().abs().sum().item(),
            "device": device}


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"measurement {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--kd-seq", type=int, default=1024, help="positions for the KD measurements")
    p.add_argument("--chunk", type=int, nargs="+", default=[128, 256, 1024], help="positions per chunk")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--kd", nargs="*", default=["forward-kl"], help="divergences to measure besides CE")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # chunk, dtype (child)
    p.add_argument("--one-kd", default="", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true",
                   help="small sizes (512 positions, vocab 32768, fp32, one chunk size): does the bench still run")
    a = p.parse_args()
    if a.smoke:  # seconds; large enough that each loss's peak stays well above the resident set before it
        a.seq, a.kd_seq, a.vocab, a.chunk, a.dtype = 512, 256, 32768, [128], ["fp32"]
    if a.child:
        chunk, dtype = a.one
        print(json.dumps(measure(a.seq, a.vocab, a.hidden, int(chunk), dtype, a.one_kd or None)))
        return

    print(f"== loss peak memory: vocab {a.vocab}, hidden {a.hidden}, forward + backward, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"{'loss':14} {'dtype':5} {'positions':>9} {'chunk':>6} {'peak MB':>8} {'vs full':>8} {'seconds':>8} "
          f"{'vs full':>8} {'loss value':>12} {'grad checksum':>14}")
    # CE in each dtype; the divergences (about 3x CE's memory unchunked) in fp32 on fewer positions
    cases = [(None, dtype, a.seq) for dtype in a.dtype] + [(kind, "fp32", a.kd_seq) for kind in a.kd]
    for objective, dtype, seq in cases:
        base = None
        for chunk in [0, *(c for c in a.chunk if c < seq)]:
            r = run_child(["--seq", str(seq), "--vocab", str(a.vocab), "--hidden", str(a.hidden),
                           "--one", str(chunk), dtype, "--one-kd", objective or ""])
            base = base or r
            label = "CE" if objective is None else f"CE+{objective}"
            print(f"{label:14} {dtype:5} {seq:9d} {(str(chunk) if chunk else 'none'):>6} {r['peak'] / 2**20:8.0f} "
                  f"{r['peak'] / base['peak']:7.3f}x {r['seconds']:8.2f} {r['seconds'] / base['seconds']:7.2f}x "
                  f"{r['ce'] + r['kd']:12.2f} {r['grad']:14.6g}")
    print(f"device: {r['device']}")


if __name__ == "__main__":
    main()
