"""breadcrumbs (Model Breadcrumbs): drop each task vector's largest ``gamma`` share of magnitudes (outliers),
then its smallest, keeping ``density`` of the entries; then a weighted sum. Deterministic."""
from __future__ import annotations

from ._task_vectors import TaskVectorMethod
from .base import whole_tensor

NAME = "breadcrumbs"
ANCHOR = "base"
ROW = TaskVectorMethod("outliers", consensus=False)
ACCEPTS, merge_blocks = ROW.accepts, ROW.merge_blocks
merge = whole_tensor(merge_blocks)
