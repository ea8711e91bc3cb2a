"""Merge: combine fine-tuned experts into one model (mergekit semantics, plus TinyR1's Arcee Fusion)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import ApiModel, Rule
from .common import ModelRef, Output, Resources, RunPolicy

Method = Literal["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "model_stock",
                 "arcee_fusion"]
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]
NEEDS_BASE = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "model_stock", "arcee_fusion")
NEEDS_DENSITY = ("ties", "dare_ties", "dare_linear")

Density = Annotated[float, Field(gt=0, le=1)]
Weight = Annotated[float, Field(gt=0)]
Dtype = Literal["float32", "bfloat16", "float16"]

# CEL: "m is the same reference as the base" (uri equal, or the same upstream CR).
_SAME_AS_BASE = ("((has(m.uri) && has(self.base.uri) && m.uri == self.base.uri) || "
                 "(has(m.from) && has(self.base.from) && m.from.kind == self.base.from.kind && "
                 "m.from.name == self.base.from.name))")


class MergeInput(ModelRef):
    """One model to merge, with its per-model parameters."""

    weight: Weight | None = None
    """Relative weight (linear, task_arithmetic, ties, dare_*); 1.0 when unset. Not a CRD default: methods
    without weights (slerp, arcee_fusion, model_stock) reject it, and the API server stores CRD defaults."""
    density: Density | None = None
    """Fraction of the task vector kept (ties: by magnitude; dare_*: random); defaults to parameters.density."""


class TensorOverride(ApiModel):
    """Parameters for the tensors whose name matches (first match wins), e.g. a different t for attention."""

    tensors: Annotated[str, Field(min_length=1, max_length=512)]
    """Regular expression searched in the tensor name (e.g. self_attn, mlp, ^lm_head)."""
    t: Annotated[float, Field(ge=0, le=1)] | None = None
    density: Density | None = None
    weight_scale: Annotated[float, Field(ge=0)] | None = None
    """Multiplies every model's weight for these tensors."""
    lambda_: Annotated[float, Field(ge=0)] | None = Field(default=None, alias="lambda")


class MergeParameters(ApiModel):
    """Each parameter applies to some methods only, so none has a CRD default (the API server would store
    it in every Merge, and methods that do not use it reject it); the stage fills in the documented value."""

    normalize: bool | None = None
    """Divide by the sum of the weights (linear, ties, dare_ties, dare_linear); true when unset."""
    lambda_: Annotated[float, Field(ge=0, le=100)] | None = Field(default=None, alias="lambda")
    """Scale of the merged task vector (task_arithmetic, ties, dare_*); 1.0 when unset."""
    rescale: bool | None = None
    """dare_*: rescale the kept entries so the task vector's L1 norm is preserved; true when unset."""
    density: Density | None = None
    """Default density for models that set none."""
    t: Annotated[float, Field(ge=0, le=1)] | None = None
    """slerp: 0 gives the first model (or the base), 1 the other."""
    overrides: Annotated[list[TensorOverride], Field(max_length=64)] = Field(default_factory=list)


class MergeSpec(ApiModel):
    """Merge models tensor by tensor, streaming from safetensors."""

    rules = (
        Rule("!(self.method in ['" + "', '".join(NEEDS_BASE) + "']) || has(self.base)",
             "this method needs a base model", ".base", "FieldValueRequired"),
        Rule("self.method != 'slerp' || (size(self.models) == 2 && has(self.parameters.t))",
             "slerp needs exactly 2 models and parameters.t", ".models"),
        Rule("self.method != 'arcee_fusion' || size(self.models) == 2",
             "arcee_fusion merges exactly 2 models", ".models"),
        Rule("self.method != 'arcee_fusion' || !has(self.base) || self.models.exists(m, " + _SAME_AS_BASE + ")",
             "arcee_fusion needs a base that is one of the 2 models", ".base"),
        Rule("self.method != 'slerp' || !has(self.base) || self.models.exists(m, " + _SAME_AS_BASE + ")",
             "slerp's base must be one of its 2 models", ".base"),
        Rule("self.method != 'model_stock' || size(self.models) >= 2", "model_stock needs at least 2 models",
             ".models"),
        Rule("!(self.method in ['" + "', '".join(NEEDS_DENSITY) + "']) || has(self.parameters.density) || "
             "self.models.all(m, has(m.density))",
             "ties and dare_* need a density in (0, 1] for every model (per model or parameters.density)",
             ".models"),
    )
    method: Method
    base: ModelRef | None = None
    """Base model: task vectors are taken against it; config and tokenizer come from it."""
    models: Annotated[list[MergeInput], Field(min_length=1, max_length=32)]
    parameters: MergeParameters = Field(default_factory=MergeParameters)
    dtype: Dtype = "float32"
    """Compute dtype."""
    out_dtype: Dtype | None = None
    """Dtype of the written tensors; defaults to the base's (or first model's) dtype."""
    out_shard_size: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?([KMGT]i?B|B)?$", max_length=32)] = "5GB"
    """Maximum size of an output safetensors shard, e.g. 5GB, 500MiB."""
    seed: int = 0
    """Seed for random parts (dare drops, arcee_fusion's quantile sample)."""
    tokenizer_source: ModelRef | None = None
    """Take tokenizer and chat template from this model instead of the base."""
    output: Output = Field(default_factory=Output)
    resources: Resources = Field(default_factory=Resources)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
