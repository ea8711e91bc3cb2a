"""dare_linear: seeded random drop of each task vector to ``density`` (rescaled to keep its L1 norm when
``rescale``), then a weighted sum divided by the sum of the weights (normalize)."""
from __future__ import annotations

from ._task_vectors import combine
from .base import MergeInputs, MergeOutput

NAME = "dare_linear"
ANCHOR = "base"
ACCEPTS = frozenset({"weight", "density", "normalize", "lambda", "rescale", "weight_scale"})


def merge(inputs: MergeInputs) -> MergeOutput:
    p = inputs.params
    return combine(inputs, sparsify="random", consensus=False, normalize=p.normalize, rescale_l1=p.rescale)
