"""Eval: benchmark a model (math, multiple choice, code) with pass@1 averaged over k samples."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import ApiModel, Rule
from .common import DatasetRef, Engine, ModelRef, Output, Resources, RunPolicy, Sampling

FieldName = Annotated[str, Field(min_length=1, max_length=128)]


class BenchmarkFields(ApiModel):
    """Record fields of a benchmark dataset (see the README's data format)."""

    id: FieldName = "id"
    answer: FieldName = "answer"
    choices: FieldName = "choices"
    tests: FieldName = "tests"


class Benchmark(ApiModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$", max_length=63)]
    dataset: DatasetRef
    kind: Literal["math", "mcq", "code", "exact"]
    samples: Annotated[int, Field(ge=1, le=1024)] = 1
    """k: samples per question; pass@1 is the mean over them."""
    limit: Annotated[int, Field(ge=1)] | None = None
    """Use only the first N questions."""
    template: Annotated[str, Field(min_length=1, max_length=65536)] = "{{prompt}}"
    """User message; {{field}} is replaced by the record's field. mcq adds {{choices}} (lettered lines)."""
    system_prompt: Annotated[str, Field(max_length=65536)] | None = None
    shuffle_choices: bool = False
    """mcq: shuffle the options per sample (seeded), re-mapping the reference letter."""
    fields: BenchmarkFields = Field(default_factory=BenchmarkFields)


class EvalSpec(ApiModel):
    """Benchmark one model."""

    rules = (
        Rule("self.engine.name == 'openai' || has(self.model)", "a model is required unless the engine is openai",
             ".model", "FieldValueRequired"),
        Rule("self.benchmarks.all(b, self.benchmarks.exists_one(c, c.name == b.name))",
             "benchmark names must be unique", ".benchmarks"),
    )
    model: ModelRef | None = None
    engine: Engine = Field(default_factory=Engine)
    benchmarks: Annotated[list[Benchmark], Field(min_length=1, max_length=64)]
    sampling: Sampling = Field(default_factory=Sampling)
    code_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 10
    """Wall-clock limit per code test run in the sandbox."""
    output: Output = Field(default_factory=Output)
    resources: Resources = Field(default_factory=Resources)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
