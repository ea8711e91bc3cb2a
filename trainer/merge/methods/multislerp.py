"""multislerp: barycentric interpolation of any number of models on the hypersphere (mergekit 0.1.5 semantics).

With a base the vectors are the task vectors x_i = model_i - base, else the models themselves. Each x_i is
projected to the unit sphere (u_i = x_i / (|x_i| + eps)); w are the weights (divided by their sum when
normalizeWeights). The weighted Euclidean mean m = sum w_i u_i, normalized, is the tangent point; the
tangents u_i - (u_i . m) m are averaged with the weights into v, and the result is the exponential map
cos|v| m + sin|v| v / |v| (|v| taken + eps), scaled by sum w_i |x_i| (plus the base). One model: that model
as it is. A weighted mean of norm below eps (antipodal inputs) falls back, for two models, to
w_0 x_0 + w_1 x_1; for more it is an error naming the tensor.

Whole-tensor method, streamed: every vector above is a combination of the x_i, so one pass gathers their
Gram matrix (float64) and a second writes the combination (see _span); two passes over the blocks in all.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import InvalidInput
from . import _span
from .base import MergeOutput, RowBlocks, whole_tensor

NAME = "multislerp"
ANCHOR = "optional"
ACCEPTS = frozenset({"weight", "normalizeWeights", "eps"})


def coefficients(g: np.ndarray, weights: np.ndarray, eps: float, name: str) -> np.ndarray:
    """The result as sum_i c_i x_i, from the Gram matrix of the x_i."""
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    to_unit = 1.0 / (norms + eps)  # u_i = to_unit_i * x_i
    mean = weights * to_unit
    mean_norm = _span.norm(mean, g)
    if mean_norm < eps:
        if len(weights) == 2:  # two antipodal vectors: a straight line through the origin
            return weights.copy()
        raise InvalidInput(f"tensor {name}: multislerp's weighted mean of the unit vectors is zero (antipodal "
                           f"inputs whose weights cancel out); change the weights")
    mean = mean / mean_norm
    dots = to_unit * (g @ mean)  # u_i . m
    tangent = weights * to_unit - float(weights @ dots) * mean
    length = _span.norm(tangent, g) + eps
    on_sphere = math.cos(length) * mean + (math.sin(length) / length) * tangent
    return on_sphere * float(norms @ weights)


def merge_blocks(src: RowBlocks):
    weights = np.asarray(src.params.weights, dtype=np.float64)
    if len(weights) == 1:
        for x in src.blocks():
            yield MergeOutput(x.others[0].clone())
        return
    if src.params.normalize_weights:
        weights = weights / weights.sum()
    g = _span.gram(src, _span.offsets)
    c = coefficients(g, weights, float(src.params.eps), src.name)
    yield from _span.combine(src, _span.offsets, c, add_base=True)


merge = whole_tensor(merge_blocks)
