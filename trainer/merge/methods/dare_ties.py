"""dare_ties: seeded random drop of each task vector to ``density`` (rescaled to keep its L1 norm when
``rescale``), then TIES sign election and a weight-normalized mix."""
from __future__ import annotations

from ._task_vectors import combine
from .base import MergeInputs, MergeOutput

NAME = "dare_ties"
ANCHOR = "base"
ACCEPTS = frozenset({"weight", "density", "normalize", "lambda", "rescale", "weight_scale"})


def merge(inputs: MergeInputs) -> MergeOutput:
    p = inputs.params
    return combine(inputs, sparsify="random", consensus=True, normalize=p.normalize, rescale_l1=p.rescale)
