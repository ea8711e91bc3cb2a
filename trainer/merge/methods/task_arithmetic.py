"""task_arithmetic (Task Arithmetic): base + lambda * sum_k w_k * delta_k, divided by sum_k w_k only when
``normalize`` (off by default, as in mergekit)."""
from __future__ import annotations

from ._task_vectors import TaskVectorMethod
from .base import whole_tensor

NAME = "task_arithmetic"
ANCHOR = "base"
ROW = TaskVectorMethod(None, consensus=False)
ACCEPTS, merge_blocks = ROW.accepts, ROW.merge_blocks
merge = whole_tensor(merge_blocks)
