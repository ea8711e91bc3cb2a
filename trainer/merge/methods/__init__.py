"""Merge methods, one module each: ``NAME``, ``ANCHOR`` ("base": needs the base; "first": the base or the
first model; "optional": the base when set, else none; None: no anchor), ``ACCEPTS`` (the wire names of the
parameters its code reads: equal to its row in
``api.merge_methods``, which the API and the stage's checks are generated from), ``merge_blocks(RowBlocks)`` yielding a
``MergeOutput`` per block of rows (what the engine calls), and ``merge(MergeInputs) -> MergeOutput`` on a whole
tensor (the same computation as one block)."""
from __future__ import annotations

from types import ModuleType

from . import arcee_fusion, dare_linear, dare_ties, linear, model_stock, slerp, task_arithmetic, ties
from . import breadcrumbs, breadcrumbs_ties, della, della_linear, sce
from . import karcher, multislerp, nearswap, nuslerp

METHODS: dict[str, ModuleType] = {m.NAME: m for m in (
    linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, model_stock, arcee_fusion,
    breadcrumbs, breadcrumbs_ties, della, della_linear, sce,
    nuslerp, multislerp, karcher, nearswap)}
