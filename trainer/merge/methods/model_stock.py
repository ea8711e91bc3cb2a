"""model_stock: t = N*cos / (1 + (N-1)*cos) from the mean pairwise cosine of the offsets theta_k - theta_base
(flattened), result t * mean_k(theta_k) + (1 - t) * theta_base. Needs a base plus at least 2 models."""
from __future__ import annotations

import itertools

import torch

from .base import MergeInputs, MergeOutput

NAME = "model_stock"
ANCHOR = "base"
ACCEPTS = frozenset()
NORM_FLOOR = 1e-6


def merge(inputs: MergeInputs) -> MergeOutput:
    base, others = inputs.base, inputs.others
    assert base is not None and len(others) >= 2
    offsets = [(o - base).float().reshape(-1) for o in others]
    norms = [torch.linalg.vector_norm(x) for x in offsets]
    cosines = [float((offsets[i] @ offsets[j]) / (norms[i] * norms[j]).clamp(min=NORM_FLOOR))
               for i, j in itertools.combinations(range(len(offsets)), 2)]
    cos = max(-1.0, min(1.0, sum(cosines) / len(cosines)))
    n = len(others)
    denominator = 1 + (n - 1) * cos
    t = n * cos / denominator if abs(denominator) > 1e-12 else 0.0
    mean = torch.stack(others).mean(dim=0)
    return MergeOutput(t * mean + (1 - t) * base, extra={"t": t})
