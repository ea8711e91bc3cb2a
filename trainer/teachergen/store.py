"""Per-shard committed batches: a killed worker loses at most the batch it was writing.

The store is shared with Eval and lives in :mod:`branchmerge.trainer.workers` (layout, recovery after a kill,
and the rule that only a folder's owner writes it); this module keeps TeacherGen's import path.
"""
from __future__ import annotations

from ..workers import ShardStore

__all__ = ["ShardStore"]
