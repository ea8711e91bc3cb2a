"""ties (TIES-Merging): trim each task vector to its top-``density`` magnitudes, elect a sign per entry from
the weighted sum, keep the agreeing deltas, divide by the summed weights of the kept ones (normalize)."""
from __future__ import annotations

from ._task_vectors import combine
from .base import MergeInputs, MergeOutput

NAME = "ties"
ANCHOR = "base"
ACCEPTS = frozenset({"weight", "density", "normalize", "lambda", "weight_scale"})


def merge(inputs: MergeInputs) -> MergeOutput:
    return combine(inputs, sparsify="magnitude", consensus=True, normalize=inputs.params.normalize)
