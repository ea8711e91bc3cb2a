"""task_arithmetic: base + lambda * sum_k w_k * (theta_k - theta_base)  (no normalization)."""
from __future__ import annotations

from ._task_vectors import combine
from .base import MergeInputs, MergeOutput, elementwise_blocks

NAME = "task_arithmetic"
ANCHOR = "base"
ACCEPTS = frozenset({"weight", "lambda", "weight_scale"})


def merge(inputs: MergeInputs) -> MergeOutput:
    return combine(inputs, sparsify=None, consensus=False, normalize=False)


merge_blocks = elementwise_blocks(merge)
