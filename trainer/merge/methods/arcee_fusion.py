"""arcee_fusion, as TinyR1 used it: take the other model's value only where it matters.

With B the base and O the other model: score = |O - B| * KL(softmax(O) + eps || softmax(B) + eps), the
softmax and KL over the last dimension (one KL per row of a 2-D tensor, broadcast along it; one value for
a 1-D tensor). Threshold T = median + 1.5 * (Q3 - Q1) of the scores, each quantile read from the sorted
scores at index floor(q * (n - 1)); above SAMPLE_SIZE entries the quantiles come from a seeded uniform
sample (with replacement) of SAMPLE_SIZE scores. Result = B + (O - B) * [score >= T].
"""
from __future__ import annotations

import torch

from .base import MergeInputs, MergeOutput

NAME = "arcee_fusion"
ANCHOR = "base"
ACCEPTS = frozenset()
EPS = 1e-8
SAMPLE_SIZE = 1_000_000
QUANTILES = (0.25, 0.5, 0.75)
ROW_BLOCK_BYTES = 64 << 20  # softmax/KL temporaries are computed a block of rows at a time


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|O - B| * row-wise KL(softmax(O) || softmax(B)), in float32 whatever the compute dtype."""
    o = other.float() if other.dim() else other.float().reshape(1)
    b = base.float() if base.dim() else base.float().reshape(1)
    rows_o, rows_b = o.reshape(-1, o.shape[-1]), b.reshape(-1, b.shape[-1])
    kl = torch.empty(rows_o.shape[0], dtype=torch.float32)
    block = max(1, ROW_BLOCK_BYTES // max(1, rows_o.shape[1] * 4))
    for start in range(0, rows_o.shape[0], block):
        p = torch.softmax(rows_o[start:start + block], dim=-1) + EPS
        q = torch.softmax(rows_b[start:start + block], dim=-1) + EPS
        kl[start:start + block] = (p * (p / q).log()).sum(dim=-1)
    score = (o - b).abs_().reshape(-1, o.shape[-1]).mul_(kl.unsqueeze(-1))
    return score.reshape(other.shape)


def threshold(scores: torch.Tensor, generator: torch.Generator) -> float:
    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE_SIZE:
        flat = flat[torch.randint(flat.numel(), (SAMPLE_SIZE,), generator=generator)]
    ordered = torch.sort(flat).values
    n = ordered.numel()
    q1, median, q3 = (float(ordered[int(q * (n - 1))]) for q in QUANTILES)
    return median + 1.5 * (q3 - q1)


def merge(inputs: MergeInputs) -> MergeOutput:
    base, (other,) = inputs.base, inputs.others
    assert base is not None
    scores = importance(other, base)
    take = scores >= threshold(scores, inputs.generator)
    del scores
    merged = torch.where(take, other, base)  # == B + (O - B) * mask, without rounding of the difference
    taken = int(take.sum())
    return MergeOutput(merged, [taken], take.numel() - taken)
