"""nuslerp: spherical interpolation of two models, weighted, flattened or per vector (mergekit 0.1.5 semantics).

t = w_1 / (w_0 + w_1) from the two models' weights (0.5 when they sum to ~0). With a base, the two task
vectors v_i = model_i - base are interpolated and the base added back; without one, the models themselves.
For each pair of vectors: cos = (v_0 . v_1) / (max(|v_0|, 1e-7) max(|v_1|, 1e-7)) clamped to [-1, 1],
theta = acos(cos), result (sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta); exactly colinear
vectors (1 - cos^2 <= 1e-16) are interpolated linearly. The vectors are:

- nuslerpFlatten (the default), and every 0-D or 1-D tensor: the whole tensor;
- else nuslerpRowWise: the vectors along dim 0, one per index of the other dims (W[:, j] of a matrix:
  mergekit's "row-wise" option reduces over dim 0);
- else: the vectors along the last dim (W[i, :] of a matrix).

Streaming: along the last dim, each block is merged on its own (one pass). Whole tensor: the three dot
products are gathered over the blocks first (float64 row sums, block-independent), then the blocks are
written (two passes). Along dim 0: the per-column dot products (float64, shape[1:]) are summed over the
blocks, then the blocks written (two passes; the sums, not the tensor, are held).
"""
from __future__ import annotations

import torch

from ...errors import InvalidInput
from . import _span
from .base import MergeOutput, RowBlocks, whole_tensor

NAME = "nuslerp"
ANCHOR = "optional"
ACCEPTS = frozenset({"weight", "nuslerpFlatten", "nuslerpRowWise"})
NORM_FLOOR = 1e-7
COLINEAR_EPS = 1e-8


def interpolation(s00: torch.Tensor, s11: torch.Tensor, s01: torch.Tensor,
                  t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with result = a v_0 + b v_1, from float64 sums |v_0|^2, |v_1|^2, v_0 . v_1 (any shape)."""
    n0 = s00.clamp(min=0).sqrt().clamp(min=NORM_FLOOR)
    n1 = s11.clamp(min=0).sqrt().clamp(min=NORM_FLOOR)
    cos = (s01 / (n0 * n1)).clamp(-1.0, 1.0)
    colinear = (1 - cos.square()) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    a = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin)
    b = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin)
    return a, b


def _t(weights: tuple[float, ...], name: str) -> float:
    if len(weights) != 2:  # e.g. the base also listed as a model: it is not one of the two
        raise InvalidInput(f"spec.models: nuslerp interpolates exactly 2 models besides the base, got "
                           f"{len(weights)} (tensor {name})")
    w0, w1 = weights
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _sums(v0: torch.Tensor, v1: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    return tuple((x * y).sum(dim=dim, dtype=torch.float64, keepdim=dim != 0) for x, y in ((v0, v0), (v1, v1), (v0, v1)))


def _mix(v0: torch.Tensor, v1: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None):
    out = v0 * a.to(v0.dtype) + v1 * b.to(v1.dtype)
    return out if base is None else out.add_(base)


def merge_blocks(src: RowBlocks):
    p = src.params
    t = _t(p.weights, src.name)
    ndim = len(src.original_shape if src.original_shape is not None else src.shape)
    if p.nuslerp_flatten or ndim < 2:
        g = _span.gram(src, _span.offsets)
        a, b = interpolation(*(torch.tensor(v, dtype=torch.float64) for v in (g[0, 0], g[1, 1], g[0, 1])), t)
        yield from _span.combine(src, _span.offsets, [float(a), float(b)], add_base=True)
    elif p.nuslerp_row_wise:
        totals = None
        for x in src.blocks():
            sums = _sums(*_span.offsets(x), dim=0)
            totals = sums if totals is None else tuple(s + u for s, u in zip(totals, sums))
        a, b = interpolation(*totals, t)
        for x in src.blocks():
            yield MergeOutput(_mix(*_span.offsets(x), a, b, x.base))
    else:
        for x in src.blocks():
            v0, v1 = _span.offsets(x)
            a, b = interpolation(*_sums(v0, v1, dim=-1), t)
            yield MergeOutput(_mix(v0, v1, a, b, x.base))


merge = whole_tensor(merge_blocks)
