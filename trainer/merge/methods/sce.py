"""sce (FuseChat's Select, Calculate, Erase) over the task vectors delta_k = theta_k - theta_base.

Select: with ``selectTopk`` < 1, keep the entries whose variance across the task vectors (population
variance, per entry) is among the largest ``int(selectTopk * nonzero)``, nonzero the entries of nonzero
variance; ties at the cut by position. Calculate: each model's weight is the mean of its selected task
vector's squares over the whole tensor, divided by their sum (equal weights when that sum is below 1e-6,
as mergekit does). Erase: per entry, keep the task vectors whose sign agrees with the sign of their sum
(zeros never agree). Result: base + sum_k w_k * kept_k / max(sum_k w_k * [kept_k], 1e-6).

Streaming: a counting pass for the nonzero variances, the cut's passes (``_task_vectors.top_k_cuts`` over
the variance), a pass summing squares, then the output: memory stays at a block of rows.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ._task_vectors import MagnitudeCut, magnitude_sample, top_k_cuts
from .base import MergeInputs, MergeOutput, RowBlocks, whole_tensor

NAME = "sce"
ANCHOR = "base"
ACCEPTS = frozenset({"selectTopk"})
WEIGHT_FLOOR = 1e-6


def _variance(x: MergeInputs) -> torch.Tensor:
    """Per entry, the population variance of the task vectors, in float32."""
    deltas = torch.stack([o - x.base for o in x.others]).float()
    return deltas.var(dim=0, unbiased=False)


def _selection(src: RowBlocks) -> MagnitudeCut | None | bool:
    """The cut on the variance keeping the selected entries; None: keep all; False: keep nothing."""
    topk = src.params.select_topk
    if topk >= 1:
        return None
    nonzero = sum(int(torch.count_nonzero(_variance(x))) for x in src.blocks())
    k = int(nonzero * topk)
    if k == 0:
        return False

    def variances() -> Iterator[tuple]:  # as (base, [other]) pairs whose |other - base| is the variance
        for x in src.blocks():
            var = _variance(x)
            yield torch.zeros_like(var), [var]

    sample = magnitude_sample(src, lambda x: [_variance(x).reshape(-1).numpy()])
    (cut,) = top_k_cuts(variances, src.numel, [k], sample)
    return cut


def _selected(x: MergeInputs, cut: MagnitudeCut | None | bool) -> list[torch.Tensor]:
    """The task vectors of one block, with the entries the selection drops set to 0."""
    deltas = [o - x.base for o in x.others]
    if cut is None:
        return deltas
    keep = torch.zeros_like(deltas[0]) if cut is False else cut.keep(_variance(x), deltas[0].dtype)
    return [d.mul_(keep) for d in deltas]


def _fresh(cut):
    return cut if cut is None or cut is False else MagnitudeCut(cut.threshold, cut.ties, cut.all_ties)


def merge_blocks(src: RowBlocks) -> Iterator[MergeOutput]:
    cut = _selection(src)
    count = None
    squares = None
    first = _fresh(cut)
    for x in src.blocks():
        deltas = _selected(x, first)
        sums = torch.stack([d.double().square().sum() for d in deltas])
        squares = sums if squares is None else squares + sums
        count = len(deltas)
    means = (squares / src.numel).float()
    total = float(means.sum())
    weights = ([1.0 / count] * count if abs(total) < WEIGHT_FLOOR else [float(m) / total for m in means])
    second = _fresh(cut)
    for x in src.blocks():
        deltas = _selected(x, second)
        elected = torch.stack(deltas).sum(dim=0).ge_(0).to(x.base.dtype).mul_(2).sub_(1)
        mixed = torch.zeros_like(x.base)
        divisor = torch.zeros_like(x.base)
        taken = []
        for w, d in zip(weights, deltas):
            agree = (d * elected).gt_(0).to(x.base.dtype)
            mixed.add_(d * agree, alpha=w)
            divisor.add_(agree, alpha=w)
            taken.append(int(agree.sum(dtype=torch.float64)))
        yield MergeOutput(mixed.div_(divisor.clamp_(min=WEIGHT_FLOOR)).add_(x.base), taken)


merge = whole_tensor(merge_blocks)
