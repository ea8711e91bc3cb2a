"""arcee_fusion, as TinyR1 used it: take the other model's value only where it matters.

With B the base and O the other model: score = |O - B| * KL(softmax(O) + eps || softmax(B) + eps), the
softmax and KL over the last dimension (one KL per row of a 2-D tensor, broadcast along it; one value for
a 1-D tensor). Threshold T = median + 1.5 * (Q3 - Q1) of the scores, each quantile read from the sorted
scores at index floor(q * (n - 1)); above SAMPLE_SIZE entries the quantiles come from a seeded uniform
sample (with replacement) of SAMPLE_SIZE scores. Result = B + (O - B) * [score >= T].
"""
from __future__ import annotations

import numpy as np
import torch

from .base import MergeInputs, MergeOutput, RowBlocks

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
    return _iqr_threshold(flat)


def _iqr_threshold(flat: torch.Tensor) -> float:
    n = flat.numel()
    positions = [int(q * (n - 1)) for q in QUANTILES]
    # a partial sort around the three positions gives exactly sorted[position] (several times faster)
    ordered = np.partition(flat.float().numpy(), positions)
    q1, median, q3 = (float(ordered[i]) for i in positions)
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


def merge_blocks(src: RowBlocks):
    """Two passes over row blocks: gather the (same) seeded sample of scores, then select block by block.
    Scores are row-local (KL over the last dimension), so blocks of whole rows give the same values."""
    numel = 1
    for d in src.shape:
        numel *= d
    if numel <= SAMPLE_SIZE:  # the exact quantiles need every score; such a tensor is small anyway
        yield merge(src.inputs(0, src.shape[0]))
        return
    per_row = numel // src.shape[0]
    drawn = torch.randint(numel, (SAMPLE_SIZE,), generator=src.generator)
    order = torch.argsort(drawn)
    drawn_sorted = drawn[order]
    sample = torch.empty(SAMPLE_SIZE, dtype=torch.float32)
    for start, end in src.ranges():
        inputs = src.inputs(start, end)
        scores = importance(inputs.others[0], inputs.base).reshape(-1)
        lo, hi = (int(torch.searchsorted(drawn_sorted, start * per_row)),
                  int(torch.searchsorted(drawn_sorted, end * per_row)))
        sample[order[lo:hi]] = scores[drawn_sorted[lo:hi] - start * per_row]
    cut = _iqr_threshold(sample)
    for start, end in src.ranges():
        inputs = src.inputs(start, end)
        base, (other,) = inputs.base, inputs.others
        take = importance(other, base) >= cut
        taken = int(take.count_nonzero())
        yield MergeOutput(torch.where(take, other, base), [taken], take.numel() - taken)
