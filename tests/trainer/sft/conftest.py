"""Fixtures of the BranchSFT tests (helpers live in sft_helpers.py: a unique module name)."""
from __future__ import annotations

from pathlib import Path

import pytest

from sft_helpers import reasoning_records, write_jsonl


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sftdata") / "train.jsonl", reasoning_records(32, seed=1))
