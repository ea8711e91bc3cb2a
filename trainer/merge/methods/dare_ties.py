"""dare_ties: seeded random drop of each task vector to ``density`` (rescaled to keep its L1 norm when
``rescale``), then TIES sign election and a weight-normalized mix."""
from __future__ import annotations

from ._task_vectors import combine_blocks
from .base import RowBlocks, whole_tensor

NAME = "dare_ties"
ANCHOR = "base"
ACCEPTS = frozenset({"weight", "density", "normalize", "lambda", "rescale"})


def merge_blocks(src: RowBlocks):
    return combine_blocks(src, sparsify="random", consensus=True, normalize=src.params.normalize,
                          rescale_l1=src.params.rescale)


merge = whole_tensor(merge_blocks)
