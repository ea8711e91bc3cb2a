"""ties (TIES-Merging): trim each task vector to its top-``density`` magnitudes, elect a sign per entry from
the weighted sum, keep the agreeing deltas, divide by the summed weights of the kept ones (normalize)."""
from __future__ import annotations

from ._task_vectors import TaskVectorMethod
from .base import whole_tensor

NAME = "ties"
ANCHOR = "base"
ROW = TaskVectorMethod("magnitude", consensus=True)
ACCEPTS, merge_blocks = ROW.accepts, ROW.merge_blocks
merge = whole_tensor(merge_blocks)
