"""della (DELLA-Merging, MagPrune): seeded drop of each task vector where an entry's keep probability rises
with its magnitude's rank in its row, from density - epsilon to density + epsilon (rescaled to keep the L1
norm when ``rescale``); then TIES sign election and the mix."""
from __future__ import annotations

from ._task_vectors import TaskVectorMethod
from .base import whole_tensor

NAME = "della"
ANCHOR = "base"
ROW = TaskVectorMethod("della", consensus=True)
ACCEPTS, merge_blocks = ROW.accepts, ROW.merge_blocks
merge = whole_tensor(merge_blocks)
