"""ties (TIES-Merging): trim each task vector to its top-``density`` magnitudes, elect a sign per entry from
the weighted sum, keep the agreeing deltas, divide by the summed weights of the kept ones (normalize)."""
from __future__ import annotations

from ._task_vectors import combine_blocks
from .base import RowBlocks, whole_tensor

NAME = "ties"
ANCHOR = "base"
ACCEPTS = frozenset({"weight", "density", "normalize", "lambda"})


def merge_blocks(src: RowBlocks):
    return combine_blocks(src, sparsify="magnitude", consensus=True, normalize=src.params.normalize)


merge = whole_tensor(merge_blocks)
