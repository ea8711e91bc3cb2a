"""della_linear: DELLA's MagPrune drop (see della), then a weighted sum."""
from __future__ import annotations

from ._task_vectors import TaskVectorMethod
from .base import whole_tensor

NAME = "della_linear"
ANCHOR = "base"
ROW = TaskVectorMethod("della", consensus=False)
ACCEPTS, merge_blocks = ROW.accepts, ROW.merge_blocks
merge = whole_tensor(merge_blocks)
