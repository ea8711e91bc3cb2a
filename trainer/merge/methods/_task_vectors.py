"""Shared pieces of the task-vector family (task_arithmetic, ties, dare_linear, dare_ties).

Task vectors: delta_k = theta_k - theta_base. Sparsification keeps a ``density`` fraction of each delta
(by magnitude for TIES, by a seeded Bernoulli draw for DARE); sign election keeps, per entry, the deltas
that agree with the sign of the weighted sum; the mix is divided by the summed weights of what was kept.
"""
from __future__ import annotations

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
    threshold = torch.kthvalue(flat, numel - k + 1).values  # the k-th largest magnitude
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
    """Zero the dropped entries; optionally rescale so the L1 norm of the task vector is preserved."""
    if keep is None:
        return delta
    kept = delta * keep
    if not rescale_l1:
        return kept
    before = delta.abs().sum(dtype=torch.float32)
    after = kept.abs().sum(dtype=torch.float32)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after).to(kept.dtype)


def combine(inputs: MergeInputs, sparsify: str | None, consensus: bool, normalize: bool,
            rescale_l1: bool = False) -> MergeOutput:
    """base + lambda * mix(sparsified weighted deltas); ``sparsify`` is None, "magnitude" or "random"."""
    base, p = inputs.base, inputs.params
    assert base is not None
    if not inputs.others:
        return MergeOutput(base.clone(), [], 0)
    deltas = []
    for k, other in enumerate(inputs.others):
        delta = other - base
        if sparsify == "magnitude":
            delta = apply_keep(delta, magnitude_keep(delta, p.densities[k]), rescale_l1)
        elif sparsify == "random":
            delta = apply_keep(delta, random_keep(delta, p.densities[k], inputs.generator), rescale_l1)
        deltas.append(delta)
    stacked = torch.stack(deltas)
    del deltas
    weights = torch.tensor(p.weights, dtype=stacked.dtype).view(-1, *([1] * base.dim()))
    weighted = stacked * weights
    del stacked
    if consensus:
        majority = torch.where(weighted.sum(dim=0) >= 0, 1, -1).to(weighted.dtype)
        agree = torch.sign(weighted) == majority  # zeros (dropped entries) never agree
        mixed = (weighted * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        taken = [int(a.sum()) for a in agree]
    else:
        mixed = weighted.sum(dim=0)
        total = float(sum(p.weights))
        divisor = torch.tensor(total if abs(total) >= 1e-8 else 1.0, dtype=weighted.dtype)
        taken = [int(torch.count_nonzero(w)) for w in weighted] if sparsify else None
    if normalize:
        mixed = mixed / divisor
    return MergeOutput(base + p.lambda_ * mixed, taken)
