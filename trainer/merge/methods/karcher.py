"""karcher: the Karcher (Riemannian) mean of the models on the hypersphere (mergekit 0.1.5 semantics).

Every input counts once with the same weight: the base when set (it is one of the inputs, not an origin:
no task vectors) and the models. Each tensor x_i is split into its norm and direction u_i = x_i / |x_i|;
inputs of norm <= tol take no part in the direction. The direction m starts at the normalized mean of the
u_i (the first u_i if that mean is shorter than tol) and moves, for up to maxIter iterations, along the
mean of the log maps: v = mean_i theta_i / sin(theta_i) * (u_i - cos(theta_i) m), theta_i = acos(u_i . m)
(inputs with theta_i < tol add nothing), m <- cos|v| m + sin|v| v / |v|, renormalized; it stops once
|v| < tol. The result is m times the mean of all the norms; zeros if no input has a norm above tol.

Cost: m and v stay combinations of the inputs, so the iteration runs on the k x k Gram matrix of the
inputs (float64, gathered in one pass over the blocks) and costs O(k^2) per iteration, not a pass over the
tensor; a second pass writes the result. Two passes over the blocks whatever maxIter is.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _span
from .base import MergeInputs, RowBlocks, whole_tensor

NAME = "karcher"
ANCHOR = "first"  # the base when set, else the first model: one more input, not an origin
ACCEPTS = frozenset({"maxIter", "tol"})


def _inputs(x: MergeInputs) -> list[torch.Tensor]:
    return ([] if x.base is None else [x.base]) + list(x.others)


def coefficients(g: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """The Karcher mean as sum_i c_i x_i, from the Gram matrix of the inputs x_i."""
    k = len(g)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return np.zeros(k)
    units = np.zeros((k, k))  # row i: u_i as coefficients over the inputs
    for i in valid:
        units[i, i] = 1.0 / norms[i]
    alpha = 1.0 / len(valid)
    mean = alpha * units[valid].sum(axis=0)
    length = _span.norm(mean, g)
    mean = units[valid[0]].copy() if length < tol else mean / length
    for _ in range(max_iter):
        cosines = np.clip(units[valid] @ g @ mean, -1.0, 1.0)
        tangent = np.zeros(k)
        for i, cos in zip(valid, cosines):
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent += alpha * (theta / math.sin(theta)) * (units[i] - cos * mean)
        step = _span.norm(tangent, g)
        if step < tol:
            break
        mean = math.cos(step) * mean + (math.sin(step) / step) * tangent
        length = _span.norm(mean, g)
        if length > tol:
            mean = mean / length
    return mean * float(norms.mean())


def merge_blocks(src: RowBlocks):
    g = _span.gram(src, _inputs)
    c = coefficients(g, int(src.params.max_iter), float(src.params.tol))
    yield from _span.combine(src, _inputs, c, add_base=False)


merge = whole_tensor(merge_blocks)
