"""The decontamination gate: benchmark questions that training data must not contain.

Declared on a TeacherGen (its prompts before generation, its kept traces after) or a BranchSFT (the user
turns of its training records). A record matching a benchmark question is dropped and counted by reason:

- ``exact``: its normalised text equals a question's;
- ``near-duplicate``: the Jaccard similarity of its word 5-gram shingles with a question's is at least
  ``nearDuplicate`` (exact similarity, not a MinHash estimate: benchmarks are small);
- ``ngram``: it shares a word n-gram (``ngram`` words, 8 by default as Open-R1's decontamination) with a
  question; a question shorter than ``ngram`` words (but of 3 or more) is a hit when contained whole.

Text is normalised before matching: Unicode NFKC, lower case, punctuation replaced by spaces, whitespace
collapsed (the implementation: branchmerge.trainer.decontamination).
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .base import ApiModel
from .common import DatasetRef

FieldName = Annotated[str, Field(min_length=1, max_length=128)]

# the record fields Eval benchmarks keep their question in (docs/eval-data.md): `prompt` for every converted
# release; `problem` and `question` as the public releases name it (AIME, MATH-500; LiveCodeBench)
DEFAULT_QUESTION_FIELDS = ("prompt", "problem", "question")


class Decontamination(ApiModel):
    """Benchmark datasets to decontaminate the training data against."""

    benchmarks: Annotated[list[DatasetRef], Field(min_length=1, max_length=16)]
    """Benchmark datasets (same formats as an Eval's): a uri, or `from:` an upstream TeacherGen."""
    question_fields: Annotated[list[FieldName], Field(min_length=1, max_length=8)] = Field(
        default_factory=lambda: list(DEFAULT_QUESTION_FIELDS))
    """Benchmark record fields holding question text; each present string field is indexed (a record with
    none of them is an error)."""
    ngram: Annotated[int, Field(ge=3, le=64)] = 8
    """Words per n-gram of the overlap check (Open-R1 uses 8)."""
    near_duplicate: Annotated[float, Field(gt=0, le=1)] = 0.8
    """Jaccard similarity of word 5-gram shingles at or above which a record is a near-duplicate of a
    question (0.8 as Lee et al. 2022's NearDup); 1 keeps only exact set equality."""
