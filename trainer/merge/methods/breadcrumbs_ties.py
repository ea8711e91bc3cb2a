"""breadcrumbs_ties: Model Breadcrumbs' sparsification (see breadcrumbs), then TIES sign election and the mix."""
from __future__ import annotations

from ._task_vectors import TaskVectorMethod
from .base import whole_tensor

NAME = "breadcrumbs_ties"
ANCHOR = "base"
ROW = TaskVectorMethod("outliers", consensus=True)
ACCEPTS, merge_blocks = ROW.accepts, ROW.merge_blocks
merge = whole_tensor(merge_blocks)
