"""TeacherGen: a teacher writes reasoning traces for domain prompts; they are verified, filtered and stored."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import ApiModel, Rule
from .common import DatasetRef, Engine, ModelRef, Output, Resources, RunPolicy, Sampling
from .decontamination import Decontamination

TINYR1_MATH_TEMPLATE = "{{problem}}\nPlease reason step by step, and put your final answer within \\boxed{}."

FieldName = Annotated[str, Field(min_length=1, max_length=128)]


class Teacher(ApiModel):
    """The teacher model and the engine that serves it."""

    rules = (
        Rule("self.engine.name == 'openai' || has(self.model)", "a model is required unless the engine is openai",
             ".model", "FieldValueRequired"),
    )
    model: ModelRef | None = None
    engine: Engine = Field(default_factory=Engine)


class Prompts(ApiModel):
    """Where the prompts are and which record fields to use."""

    dataset: DatasetRef
    id_field: FieldName | None = None
    """Record field with a stable id; when absent an id is derived from the prompt text."""
    fields: Annotated[list[FieldName], Field(max_length=32)] = Field(default_factory=list)
    """Extra record fields to carry into the output records (e.g. source, domain)."""
    limit: Annotated[int, Field(ge=1)] | None = None
    """Use only the first N prompts (after sorting by id)."""


class TeacherSampling(Sampling):
    samples_per_prompt: Annotated[int, Field(ge=1, le=256)] = 1
    """Samples per prompt (vLLM's n; not called `n`, which Go YAML 1.1 -- kubectl, Helm -- reads as false)."""


class Verify(ApiModel):
    """How each sample is checked against the record's reference."""

    rules = (
        Rule("self.kind == 'none' || self.kind == 'code' || has(self.answerField)",
             "math and mcq verification need answerField", ".answerField", "FieldValueRequired"),
        Rule("self.kind != 'code' || has(self.testsField)", "code verification needs testsField", ".testsField",
             "FieldValueRequired"),
    )
    kind: Literal["math", "mcq", "code", "none"] = "none"
    answer_field: FieldName | None = None
    """Record field with the reference answer (math: the expression; mcq: the letter)."""
    tests_field: FieldName | None = None
    """Record field with the tests (code)."""
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 10
    """Wall-clock limit per code test run."""
    memory_mb: Annotated[int, Field(ge=16, le=65536)] = 512
    """Memory limit of the code sandbox."""


class Select(ApiModel):
    """Which verified samples of a prompt are kept."""

    mode: Literal["all", "all-correct", "first-correct"] = "all"
    max_per_prompt: Annotated[int, Field(ge=1)] | None = None


class Filters(ApiModel):
    max_response_tokens: Annotated[int, Field(ge=1)] | None = None
    require_think: bool = False
    """Keep only responses with a closed <think>...</think> block."""
    dedup: bool = True
    """Drop exact duplicates of a prompt's normalised responses."""


class TeacherGenSpec(ApiModel):
    """Generate, verify and filter teacher traces into a chat-form JSONL dataset."""

    rules = (
        Rule("self.select.mode == 'all' || self.verify.kind != 'none'",
             "select.mode all-correct/first-correct needs a verify.kind other than none", ".select.mode"),
    )
    teacher: Teacher
    prompts: Prompts
    template: Annotated[str, Field(min_length=1, max_length=65536)] = "{{prompt}}"
    """User message; {{field}} is replaced by the record's field (single braces are literal, e.g. \\boxed{})."""
    system_prompt: Annotated[str, Field(max_length=65536)] | None = None
    sampling: TeacherSampling = Field(default_factory=TeacherSampling)
    verify: Verify = Field(default_factory=Verify)
    select: Select = Field(default_factory=Select)
    filters: Filters = Field(default_factory=Filters)
    decontaminate: Decontamination | None = None
    """Drop prompts (before generation) and kept traces (after) that match these benchmarks' questions."""
    shards: Annotated[int, Field(ge=1, le=4096)] = 1
    """Deterministic split of the prompts (by id); one worker per shard on Kubernetes."""
    batch_size: Annotated[int, Field(ge=1, le=100000)] = 64
    """At most this many finished prompts per commit (per shard); prompts are committed as they finish, at the
    latest after $BRANCHMERGE_COMMIT_SECONDS (10), so a killed worker loses at most one uncommitted group."""
    output: Output = Field(default_factory=Output)
    resources: Resources = Field(default_factory=Resources)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
