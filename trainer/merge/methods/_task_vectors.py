"""Shared pieces of the task-vector family (task_arithmetic, ties, dare_linear, dare_ties).

Task vectors: delta_k = theta_k - theta_base. Sparsification keeps a ``density`` fraction of each delta
(by magnitude for TIES, by a seeded Bernoulli draw for DARE); sign election keeps, per entry, the deltas
that agree with the sign of the weighted sum; the mix is divided by the summed weights of what was kept.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import MergeInputs, MergeOutput

RESCALE_EPS = 1e-7


def magnitude_keep(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """Mask of exactly ``int(density * numel)`` entries of largest |delta| (None: keep everything).

    Ties at the threshold magnitude are broken by position, so the count is exact and deterministic
    (bf16 deltas have many equal magnitudes). Uses a selection, not a full sort.
    """
    numel = delta.numel()
    if density >= 1 or numel == 0:
        return None
    k = int(density * numel)
    flat = delta.reshape(-1).abs().float()
    if k == 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    # the k-th largest magnitude; numpy's introselect is several times faster than torch.kthvalue on CPU
    threshold = torch.tensor(np.partition(flat.numpy(), numel - k)[numel - k])
    keep = flat > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        at_threshold = torch.nonzero(flat == threshold).flatten()[:missing]
        keep[at_threshold] = True
    return keep.view(delta.shape)


def random_keep(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor | None:
    """Seeded Bernoulli(density) mask (None: keep everything)."""
    if density >= 1:
        return None
    return torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density


def apply_keep(delta: torch.Tensor, keep: torch.Tensor | None, rescale_l1: bool) -> torch.Tensor:
    """Zero the dropped entries (in place: ``delta`` is a fresh task vector) and optionally rescale so the
    task vector keeps its L1 norm."""
    if keep is None:
        return delta
    before = delta.abs().sum(dtype=torch.float32) if rescale_l1 else None
    delta.mul_(keep)
    if before is None:
        return delta
    after = delta.abs().sum(dtype=torch.float32)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return delta
    return delta.mul_((before / after).to(delta.dtype))


def combine(inputs: MergeInputs, sparsify: str | None, consensus: bool, normalize: bool,
            rescale_l1: bool = False) -> MergeOutput:
    """base + lambda * mix(sparsified weighted deltas); ``sparsify`` is None, "magnitude" or "random".

    Written as a few in-place passes over one task vector at a time: memory traffic, not arithmetic, is
    what a merge costs on a CPU.
    """
    base, p = inputs.base, inputs.params
    assert base is not None
    if not inputs.others:
        return MergeOutput(base.clone(), [], 0)
    weighted = []
    for k, other in enumerate(inputs.others):
        delta = other - base
        if sparsify == "magnitude":
            delta = apply_keep(delta, magnitude_keep(delta, p.densities[k]), rescale_l1)
        elif sparsify == "random":
            delta = apply_keep(delta, random_keep(delta, p.densities[k], inputs.generator), rescale_l1)
        weighted.append(delta.mul_(p.weights[k]) if p.weights[k] != 1 else delta)
    taken: list[int] | None = None
    if consensus:
        positive = _sum(weighted) >= 0  # the elected sign per entry (ties go to +)
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base) if normalize else None
        taken = []
        for w, wd in zip(p.weights, weighted):
            agree = torch.where(positive, wd > 0, wd < 0)  # zeros (dropped entries) never agree
            mixed.add_(wd.mul_(agree))
            if divisor is not None:
                divisor.add_(agree, alpha=w)
            taken.append(int(agree.count_nonzero()))
        if divisor is not None:
            mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    else:
        mixed = _sum(weighted)
        if sparsify:
            taken = [int(wd.count_nonzero()) for wd in weighted]
        total = float(sum(p.weights))
        if normalize and abs(total) >= 1e-8:
            mixed.div_(total)
    del weighted
    if p.lambda_ != 1:
        mixed.mul_(p.lambda_)
    return MergeOutput(mixed.add_(base), taken)


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    return out
