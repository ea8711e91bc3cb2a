"""slerp: spherical interpolation between two models on the flattened tensors.

t = 0 gives the anchor (the base, or the first model without a base), t = 1 the other model. The angle
comes from the normalized tensors; the interpolation weights apply to the unnormalized ones. Nearly
parallel tensors (|cos| > 0.9995) fall back to linear interpolation.
"""
from __future__ import annotations

import math

import torch

from .base import MergeOutput, RowBlocks, row_dot_sums, whole_tensor

NAME = "slerp"
ANCHOR = "first"
ACCEPTS = frozenset({"t"})
PARALLEL_COS = 0.9995
NORM_EPS = 1e-8


def merge_blocks(src: RowBlocks):
    """Two passes: the norms and the dot product (summed over blocks), then the interpolation."""
    sums = torch.cat([row_dot_sums([(x.base, x.base), (x.others[0], x.others[0]), (x.base, x.others[0])])
                      for x in src.blocks()], dim=1).sum(dim=1)
    na, nb, dot = (math.sqrt(float(sums[0])), math.sqrt(float(sums[1])), float(sums[2]))
    t = float(src.params.t)
    cos = dot / ((na if na > NORM_EPS else 1.0) * (nb if nb > NORM_EPS else 1.0))
    if abs(cos) > PARALLEL_COS:
        for x in src.blocks():
            yield MergeOutput(torch.lerp(x.base, x.others[0], t))
        return
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    s_a = math.sin((1 - t) * theta) / sin_theta
    s_b = math.sin(t * theta) / sin_theta
    for x in src.blocks():
        yield MergeOutput(s_a * x.base + s_b * x.others[0])


merge = whole_tensor(merge_blocks)
