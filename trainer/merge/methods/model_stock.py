"""model_stock: t = N*cos / (1 + (N-1)*cos) from the mean pairwise cosine of the offsets theta_k - theta_base
(flattened), result t * mean_k(theta_k) + (1 - t) * theta_base. Needs a base plus at least 2 models."""
from __future__ import annotations

import itertools
import math

import torch

from .base import MergeOutput, RowBlocks, row_dot_sums, whole_tensor

NAME = "model_stock"
ANCHOR = "base"
ACCEPTS = frozenset()
NORM_FLOOR = 1e-6


def merge_blocks(src: RowBlocks):
    """Two passes: the offsets' norms and pairwise dot products (summed over blocks), then the mix."""
    row_sums, n = [], 0
    for x in src.blocks():
        offsets = [o - x.base for o in x.others]
        n = len(offsets)
        pairs = list(itertools.combinations_with_replacement(range(n), 2))  # (i, i): squared norms
        row_sums.append(row_dot_sums([(offsets[i], offsets[j]) for i, j in pairs]))
    assert n >= 2
    sums = torch.cat(row_sums, dim=1).sum(dim=1)
    gram = {pair: float(value) for pair, value in zip(pairs, sums)}
    cosines = [gram[i, j] / max(math.sqrt(gram[i, i]) * math.sqrt(gram[j, j]), NORM_FLOOR)
               for i, j in itertools.combinations(range(n), 2)]
    cos = max(-1.0, min(1.0, sum(cosines) / len(cosines)))
    denominator = 1 + (n - 1) * cos
    t = n * cos / denominator if abs(denominator) > 1e-12 else 0.0
    for x in src.blocks():
        yield MergeOutput(t * torch.stack(x.others).mean(dim=0) + (1 - t) * x.base, extra={"t": t})


merge = whole_tensor(merge_blocks)
