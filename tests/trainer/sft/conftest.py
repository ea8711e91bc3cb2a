"""Fixtures of the BranchSFT tests (plain helpers live in sft_helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.chat_templates import ASSISTANT, BOS, EOS, QWEN25_TEMPLATE, R1_TEMPLATE, USER

from .sft_helpers import reasoning_records, save_tokenizer, write_jsonl


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sftdata") / "train.jsonl", reasoning_records(32, seed=1))


@pytest.fixture(scope="session")
def r1_tokenizer(tmp_path_factory):
    """A tiny tokenizer with R1-Distill's markers as special tokens and its template's structure."""
    from branchmerge.trainer.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"bos_token": BOS, "eos_token": EOS, "additional_special_tokens": [USER, ASSISTANT]})
    return save_tokenizer(tok, tmp_path_factory.mktemp("r1tok"), R1_TEMPLATE)


@pytest.fixture(scope="session")
def qwen_tokenizer(tmp_path_factory):
    """A tiny tokenizer with Qwen2.5's ChatML structure (default system prompt)."""
    from branchmerge.trainer.tiny import build_tokenizer

    return save_tokenizer(build_tokenizer(), tmp_path_factory.mktemp("qwentok"), QWEN25_TEMPLATE)
