"""Eval: benchmark a model (math, multiple choice, code) with pass@1 averaged over k samples."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import ApiModel, Rule
from .common import DatasetRef, Engine, ModelRef, Name, Output, Resources, RunPolicy, Sampling, Uri

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


class EvalFrom(ApiModel):
    """An upstream Eval in the same namespace whose output holds the saved generations."""

    kind: Literal["Eval"]
    """Kind of the upstream CR: Eval."""
    name: Name
    """Name of the upstream Eval."""


class GenerationsRef(DatasetRef):
    """Saved generations: a published Eval output folder (results.json + records/*.jsonl) at a URI, or the
    output of an upstream Eval."""

    uri: Uri | None = None
    """Where the Eval output folder is (results.json, records/*.jsonl and its _manifest.json)."""
    from_: EvalFrom | None = Field(default=None, alias="from")  # type: ignore[assignment]
    """Use the output of this upstream Eval once it has succeeded."""


class EvalSpec(ApiModel):
    """Benchmark one model, or re-grade another Eval's saved generations (``regrade``)."""

    rules = (
        Rule("has(self.regrade) || self.engine.name == 'openai' || has(self.model)",
             "a model is required unless the engine is openai or the Eval re-grades saved generations (regrade)",
             ".model", "FieldValueRequired"),
        Rule("has(self.benchmarks) != has(self.regrade)",
             "an Eval either generates answers to benchmarks or re-grades another Eval's saved generations "
             "(regrade, whose benchmarks it keeps): set exactly one of benchmarks or regrade", ".benchmarks"),
        Rule("!has(self.regrade) || !has(self.model)",
             "regrade re-grades saved generations without a model: leave model out", ".model",
             "FieldValueForbidden"),
        Rule("!has(self.regrade) || !has(self.resources) || ((!has(self.resources.gpusPerNode) || "
             "self.resources.gpusPerNode == 0) && (!has(self.resources.nodes) || self.resources.nodes == 1))",
             "regrade runs no model: one pod without GPUs (resources.gpusPerNode 0, resources.nodes 1)",
             ".resources", "FieldValueForbidden"),
        Rule("!has(self.benchmarks) || self.benchmarks.all(b, self.benchmarks.exists_one(c, c.name == b.name))",
             "benchmark names must be unique", ".benchmarks"),
    )
    model: ModelRef | None = None
    engine: Engine = Field(default_factory=Engine)
    benchmarks: Annotated[list[Benchmark], Field(min_length=1, max_length=64)] | None = None
    """What to generate and grade. Left out when the Eval re-grades (regrade)."""
    regrade: GenerationsRef | None = None
    """Re-grade the saved generations of another Eval (records/*.jsonl of its output) with the current
    graders instead of generating: no model, engine or GPU is used, the output has the same layout plus
    changes.jsonl (the samples whose verdict changed). ``branchmerge rescore`` does the same from the CLI."""
    sampling: Sampling = Field(default_factory=Sampling)
    code_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 10
    """Wall-clock limit per code test run in the sandbox."""
    output: Output = Field(default_factory=Output)
    resources: Resources = Field(default_factory=Resources)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
