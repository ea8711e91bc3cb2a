"""Spherical methods whose result lies in the span of their input vectors (multislerp, karcher, nuslerp on
the flattened tensors): every vector they build is a combination sum_i c_i x_i of the inputs, so all the
norms and dot products they need come from the k x k Gram matrix G_ij = x_i . x_j. One pass over the row
blocks gathers G (float64); the method then works on k coefficients, and a second pass writes
sum_i c_i x_i block by block. Memory: the blocks plus k(k+1)/2 float64 sums per row, never the tensor."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from .base import MergeInputs, MergeOutput, RowBlocks, row_dot_sums

Vectors = Callable[[MergeInputs], list[torch.Tensor]]


def offsets(x: MergeInputs) -> list[torch.Tensor]:
    """The other models minus the base (their task vectors), or the models themselves without a base."""
    return list(x.others) if x.base is None else [o - x.base for o in x.others]


def gram(src: RowBlocks, vectors: Vectors) -> np.ndarray:
    """G_ij = x_i . x_j (float64) over the whole tensor, in one pass over the blocks. The per-row sums are
    added up at the end, so G does not depend on how the tensor was cut into blocks."""
    row_sums, k = [], 0
    for x in src.blocks():
        vs = vectors(x)
        k = len(vs)
        pairs = [(i, j) for i in range(k) for j in range(i, k)]
        row_sums.append(row_dot_sums([(vs[i], vs[j]) for i, j in pairs]))
    sums = torch.cat(row_sums, dim=1).sum(dim=1).numpy()
    g = np.empty((k, k))
    for (i, j), value in zip(pairs, sums):
        g[i, j] = g[j, i] = value
    return g


def norm(c: np.ndarray, g: np.ndarray) -> float:
    """|sum_i c_i x_i| from the Gram matrix (rounding can make the square a hair below 0)."""
    return float(np.sqrt(max(0.0, float(c @ g @ c))))


def combine(src: RowBlocks, vectors: Vectors, coefficients: np.ndarray, add_base: bool) -> Iterator[MergeOutput]:
    """Second pass: sum_i c_i x_i per block (plus the base when ``add_base``), in the compute dtype."""
    for x in src.blocks():
        vs = vectors(x)
        out = vs[0] * float(coefficients[0])
        for c, v in zip(coefficients[1:], vs[1:]):
            out = out.add_(v, alpha=float(c))
        if add_base and x.base is not None:
            out = out.add_(x.base)
        yield MergeOutput(out)
