"""dare_linear: seeded random drop of each task vector to ``density`` (rescaled to keep its L1 norm when
``rescale``), then a weighted sum."""
from __future__ import annotations

from ._task_vectors import TaskVectorMethod
from .base import whole_tensor

NAME = "dare_linear"
ANCHOR = "base"
ROW = TaskVectorMethod("random", consensus=False)
ACCEPTS, merge_blocks = ROW.accepts, ROW.merge_blocks
merge = whole_tensor(merge_blocks)
