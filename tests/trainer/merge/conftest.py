"""Fixtures of the Merge tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from branchmerge.trainer.tiny import fine_tuned_copy


@pytest.fixture(scope="module")
def variants(tiny_model, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The tiny model and two copies with different random deltas (float32): what the comparisons with
    mergekit merge."""
    root = tmp_path_factory.mktemp("mk")
    return (tiny_model, *(fine_tuned_copy(tiny_model, root / f"ft{seed}", seed, 0.01) for seed in (1, 2)))
