"""dare_ties: seeded random drop of each task vector to ``density`` (rescaled to keep its L1 norm when
``rescale``), then TIES sign election and the mix."""
from __future__ import annotations

from ._task_vectors import TaskVectorMethod
from .base import whole_tensor

NAME = "dare_ties"
ANCHOR = "base"
ROW = TaskVectorMethod("random", consensus=True)
ACCEPTS, merge_blocks = ROW.accepts, ROW.merge_blocks
merge = whole_tensor(merge_blocks)
