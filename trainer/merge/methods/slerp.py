"""slerp: spherical interpolation between two models on the flattened tensors.

t = 0 gives the anchor (the base, or the first model without a base), t = 1 the other model. The angle
comes from the normalized tensors; the interpolation weights apply to the unnormalized ones. Nearly
parallel tensors (|cos| > 0.9995) fall back to linear interpolation.
"""
from __future__ import annotations

import math

import torch

from .base import MergeInputs, MergeOutput

NAME = "slerp"
ANCHOR = "first"
ACCEPTS = frozenset({"t"})
PARALLEL_COS = 0.9995
NORM_EPS = 1e-8


def merge(inputs: MergeInputs) -> MergeOutput:
    a, (b,) = inputs.base, inputs.others
    assert a is not None
    t = float(inputs.params.t)
    na = float(torch.linalg.vector_norm(a.float()))
    nb = float(torch.linalg.vector_norm(b.float()))
    dot = float((a.float().reshape(-1) @ b.float().reshape(-1)))
    dot /= (na if na > NORM_EPS else 1.0) * (nb if nb > NORM_EPS else 1.0)
    if abs(dot) > PARALLEL_COS:
        return MergeOutput(torch.lerp(a, b, t))
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    s_a = math.sin((1 - t) * theta) / sin_theta
    s_b = math.sin(t * theta) / sin_theta
    return MergeOutput(s_a * a + s_b * b)
