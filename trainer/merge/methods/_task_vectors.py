"""Shared pieces of the task-vector family (task_arithmetic, ties, dare_linear, dare_ties).

Task vectors: delta_k = theta_k - theta_base. Sparsification keeps a ``density`` fraction of each delta
(by magnitude for TIES, by a seeded Bernoulli draw for DARE); sign election keeps, per entry, the deltas
that agree with the sign of the weighted sum; the mix is divided by the summed weights of what was kept.

Everything runs over blocks of rows small enough to stay in the CPU cache: a merge is a dozen elementwise
passes, and done on whole tensors each pass would stream the tensor through main memory again. What needs
the whole tensor (the magnitude cut, DARE's L1 rescale) is gathered in counting passes first, so memory
does not grow with the tensor either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .base import MergeOutput, RowBlocks

RESCALE_EPS = 1e-7
HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16


@dataclass
class MagnitudeCut:
    """Keeps exactly the k largest |delta| of a tensor: every entry above ``threshold`` and, of the entries
    equal to it, the first ``ties`` by position (deterministic; bf16 deltas have many equal magnitudes).
    Applied to the blocks of the tensor in row order."""

    threshold: float
    ties: int
    all_ties: bool  # every entry equal to the threshold is kept: no position bookkeeping needed

    def keep(self, magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """1 for the kept entries of this block, 0 elsewhere, in ``dtype``."""
        if self.all_ties:
            return _mask(torch.ge, magnitude, self.threshold, dtype)
        keep = _mask(torch.gt, magnitude, self.threshold, dtype)
        if self.ties > 0:
            at = torch.nonzero(magnitude.reshape(-1) == self.threshold).flatten()[:self.ties]
            keep.view(-1)[at] = 1
            self.ties -= at.numel()
        return keep


def _mask(compare, tensor: torch.Tensor, other, dtype: torch.dtype) -> torch.Tensor:
    """A comparison as 1/0 numbers: torch's CPU kernels that write bool tensors are several times slower
    than the same comparison written straight into a float tensor (measured), and the result is multiplied
    into floats anyway."""
    return compare(tensor, other, out=torch.empty(tensor.shape, dtype=dtype))


def magnitude_cuts(magnitudes: Callable[[], Iterator[list[torch.Tensor]]], numel: int,
                   densities: list[float]) -> list[MagnitudeCut | None]:
    """Per model, the cut keeping ``int(density * numel)`` entries (None: keep everything).

    A radix select over float32 |delta| blocks (``magnitudes()`` yields one list per block, a block per model,
    and is called twice): the bit patterns of non-negative floats sort like the numbers, so two counting
    passes -- the high 16 bits, then the low 16 bits inside the bucket that holds the k-th largest -- find it
    exactly in fixed memory.
    """
    ks = [int(d * numel) if d < 1 else None for d in densities]
    active = [i for i, k in enumerate(ks) if k]
    cuts: list[MagnitudeCut | None] = [None if k is None else MagnitudeCut(float("inf"), 0, False) for k in ks]
    if not active:  # keep all, or nothing (nothing is above infinity)
        return cuts
    # numpy counts: torch.bincount is ~100x slower with more than one intra-op thread (measured)
    high = np.zeros((len(ks), HIGH_BINS), dtype=np.int64)
    for block in magnitudes():
        for i in active:
            high[i] += np.bincount(_bits(block[i]) >> 16, minlength=HIGH_BINS)
    buckets = {i: _kth_largest_bin(high[i], ks[i]) for i in active}
    low = np.zeros((len(ks), LOW_BINS), dtype=np.int64)
    for block in magnitudes():
        for i in active:
            bits = _bits(block[i])
            low[i] += np.bincount(bits[(bits >> 16) == buckets[i][0]] & 0xFFFF, minlength=LOW_BINS)
    for i in active:
        bucket, above_bucket = buckets[i]
        low_bin, above_low = _kth_largest_bin(low[i], ks[i] - above_bucket)
        threshold = float(np.array([(bucket << 16) | low_bin], dtype=np.int32).view(np.float32)[0])
        ties = ks[i] - above_bucket - above_low
        cuts[i] = MagnitudeCut(threshold, ties, all_ties=ties == int(low[i, low_bin]))
    return cuts


def _bits(magnitude: torch.Tensor) -> np.ndarray:
    return magnitude.reshape(-1).numpy().view(np.int32)


def _kth_largest_bin(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry and how many entries lie in higher bins."""
    from_top = np.cumsum(counts[::-1])  # from_top[j]: entries in the top j + 1 bins
    j = int(np.searchsorted(from_top, k))  # the first j with from_top[j] >= k
    index = counts.size - 1 - j
    return index, int(from_top[j]) - int(counts[index])


def combine_blocks(src: RowBlocks, sparsify: str | None, consensus: bool, normalize: bool,
                   rescale_l1: bool = False) -> Iterator[MergeOutput]:
    """base + lambda * mix(sparsified weighted deltas), block by block; ``sparsify`` is None, "magnitude"
    or "random"."""
    p = src.params
    if not p.weights:  # no other model: the base as it is
        for inputs in src.blocks():
            assert inputs.base is not None
            yield MergeOutput(inputs.base.clone(), [], 0)
        return
    count = len(p.densities) if sparsify else 0

    def deltas() -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        for inputs in src.blocks():
            assert inputs.base is not None
            yield inputs.base, [other - inputs.base for other in inputs.others]

    def magnitudes() -> Iterator[list[torch.Tensor]]:
        return ([d.abs().float() for d in ds] for _, ds in deltas())

    cuts = magnitude_cuts(magnitudes, src.numel, list(p.densities)) if sparsify == "magnitude" else []
    scales = list(p.weights)
    if sparsify == "random" and rescale_l1:  # a first pass over the same draws: L1 norms before and after
        # (summed in float64, so the result does not depend on how the tensor is blocked)
        norms = torch.zeros(count, 2, dtype=torch.float64)
        draws = _random_draws(src, count)
        for _, ds in deltas():
            for k, d in enumerate(ds):
                keep = draws[k](d)
                norms[k, 0] += float(d.abs().sum(dtype=torch.float64))
                if keep is not None:
                    norms[k, 1] += float(d.mul_(keep).abs().sum(dtype=torch.float64))
        for k in range(count):
            before, after = float(norms[k, 0]), float(norms[k, 1])
            if p.densities[k] < 1 and before >= RESCALE_EPS and after >= RESCALE_EPS:
                scales[k] *= before / after
    draws = _random_draws(src, count) if sparsify == "random" else []

    def keep_mask(k: int, d: torch.Tensor) -> torch.Tensor | None:
        if cuts:
            return cuts[k].keep(d.abs().float(), d.dtype) if cuts[k] else None
        return draws[k](d) if draws else None

    for base, ds in deltas():
        weighted = []
        for k, d in enumerate(ds):
            keep = keep_mask(k, d)
            if keep is not None:
                d.mul_(keep)
            weighted.append(d.mul_(scales[k]) if scales[k] != 1 else d)
        yield _mix(base, weighted, p, consensus, normalize, counts_taken=sparsify is not None)


def _random_draws(src: RowBlocks, count: int) -> list[Callable[[torch.Tensor], torch.Tensor | None]]:
    """Per model, a Bernoulli(density) draw from its own generator, seeded from the tensor's seed plus the
    model's position: block after block, the draws are those of one ``rand(shape)`` per model."""
    seed = src.generator.initial_seed()
    draws = []
    for k in range(count):
        density = src.params.densities[k]
        generator = torch.Generator().manual_seed((seed + k) % (1 << 63))
        draws.append(lambda d, g=generator, density=density:
                     None if density >= 1 else
                     _mask(torch.lt, torch.rand(d.shape, generator=g, dtype=torch.float32), density, d.dtype))
    return draws


def _mix(base: torch.Tensor, weighted: list[torch.Tensor], p, consensus: bool, normalize: bool,
         counts_taken: bool) -> MergeOutput:
    taken: list[int] | None = None
    if consensus:
        # the elected sign per entry, +1 or -1 (ties go to +); a delta agrees when delta * sign > 0, so
        # zeros (dropped entries) never do
        sign = _mask(torch.ge, _sum(weighted), 0, base.dtype).mul_(2).sub_(1)
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base) if normalize else None
        taken = []
        for w, wd in zip(p.weights, weighted):
            agree = _mask(torch.gt, wd * sign, 0, base.dtype)
            mixed.addcmul_(wd, agree)
            if divisor is not None:
                divisor.add_(agree, alpha=w)
            taken.append(int(agree.sum(dtype=torch.float64)))
        if divisor is not None:
            mixed.div_(divisor.add_(_mask(torch.eq, divisor, 0, base.dtype)))  # nothing agreed: divide by 1
    else:
        mixed = _sum(weighted)
        if counts_taken:
            taken = [int(wd.count_nonzero()) for wd in weighted]
        total = float(sum(p.weights))
        if normalize and abs(total) >= 1e-8:
            mixed.div_(total)
    if p.lambda_ != 1:
        mixed.mul_(p.lambda_)
    return MergeOutput(mixed.add_(base), taken)


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    return out
