"""task_arithmetic: base + lambda * sum_k w_k * (theta_k - theta_base)  (no normalization)."""
from __future__ import annotations

from ._task_vectors import combine_blocks
from .base import RowBlocks, whole_tensor

NAME = "task_arithmetic"
ANCHOR = "base"
ACCEPTS = frozenset({"weight", "lambda"})


def merge_blocks(src: RowBlocks):
    return combine_blocks(src, sparsify=None, consensus=False, normalize=False)


merge = whole_tensor(merge_blocks)
