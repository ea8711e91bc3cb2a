"""Merge: combine fine-tuned experts into one model (mergekit semantics, plus TinyR1's Arcee Fusion)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from . import merge_methods as registry
from .base import ApiModel, Rule
from .common import ModelRef, Output, Resources, RunPolicy

Method = Literal[registry.names()]  # type: ignore[valid-type]
METHODS: tuple[str, ...] = registry.names()
NEEDS_BASE = tuple(r.name for r in registry.ROWS if r.base == "required")

Dtype = Literal["float32", "bfloat16", "float16"]

# CEL: "m is the same reference as the base" (uri equal, or the same upstream CR).
_SAME_AS_BASE = ("((has(m.uri) && has(self.base.uri) && m.uri == self.base.uri) || "
                 "(has(m.from) && has(self.base.from) && m.from.kind == self.base.from.kind && "
                 "m.from.name == self.base.from.name))")


def _param_type(name: str, doc: str | None = None):
    """The optional field type of registry parameter ``name``: its bounds and its description (with the
    methods that use it) come from the registry."""
    p = registry.PARAMS[name]
    bounds = {k: getattr(p, k) for k in ("gt", "ge", "lt", "le") if getattr(p, k) is not None}
    inner = Annotated[p.kind, Field(**bounds)] if bounds else p.kind
    methods = ", ".join(registry.accepting(name)) or "none yet"
    return Annotated[inner | None, Field(description=f"{doc or p.doc} (Methods: {methods}.)")]


def _default_for_models(name: str):
    return _param_type(name, f"Default {name} for the models that set none.")


Weight = _param_type("weight")
Density = _param_type("density")
ModelGamma, ModelEpsilon = _param_type("gamma"), _param_type("epsilon")
DefaultDensity, DefaultGamma, DefaultEpsilon = (_default_for_models(n) for n in ("density", "gamma", "epsilon"))
Normalize, Lambda, Rescale, T = (_param_type(n) for n in ("normalize", "lambda", "rescale", "t"))
SelectTopk, NuslerpFlatten, NuslerpRowWise = (_param_type(n) for n in ("selectTopk", "nuslerpFlatten", "nuslerpRowWise"))
NormalizeWeights, Eps, MaxIter, Tol = (_param_type(n) for n in ("normalizeWeights", "eps", "maxIter", "tol"))


class MergeInput(ModelRef):
    """One model to merge, with its per-model parameters (which methods use each: see "Merge methods")."""

    weight: Weight = None
    density: Density = None
    gamma: ModelGamma = None
    epsilon: ModelEpsilon = None


class TensorOverride(ApiModel):
    """Parameters for the tensors whose name matches (first match wins), e.g. a different t for attention."""

    tensors: Annotated[str, Field(min_length=1, max_length=512)]
    """Regular expression searched in the tensor name (e.g. self_attn, mlp, ^lm_head)."""
    t: Annotated[float, Field(ge=0, le=1)] | None = None
    density: Annotated[float, Field(gt=0, le=1)] | None = None
    weight_scale: Annotated[float, Field(ge=0)] | None = None
    """Multiplies every model's weight for these tensors."""
    lambda_: Annotated[float, Field(ge=0)] | None = Field(default=None, alias="lambda")


class MergeParameters(ApiModel):
    """Each parameter applies to some methods only, so none has a CRD default (the API server would store
    it in every Merge, and methods that do not use it reject it); the stage fills in the documented value
    (the method's default: see "Merge methods")."""

    normalize: Normalize = None
    lambda_: Lambda = Field(default=None, alias="lambda")
    rescale: Rescale = None
    density: DefaultDensity = None
    gamma: DefaultGamma = None
    epsilon: DefaultEpsilon = None
    t: T = None
    select_topk: SelectTopk = None
    nuslerp_flatten: NuslerpFlatten = None
    nuslerp_row_wise: NuslerpRowWise = None
    normalize_weights: NormalizeWeights = None
    eps: Eps = None
    max_iter: MaxIter = None
    tol: Tol = None
    overrides: Annotated[list[TensorOverride], Field(max_length=64)] = Field(default_factory=list)


# wire names of the fields of spec.parameters and of spec.models[i] (besides the reference's own)
def _wire_names(model) -> dict[str, str]:
    """python field name -> wire name"""
    return {n: f.alias or n for n, f in model.model_fields.items()}


GLOBAL_FIELDS = {n: w for n, w in _wire_names(MergeParameters).items() if n != "overrides"}
MODEL_FIELDS = {n: w for n, w in _wire_names(MergeInput).items() if n not in ModelRef.model_fields}
OVERRIDE_FIELDS = {n: w for n, w in _wire_names(TensorOverride).items() if n != "tensors"}
_GLOBAL_WIRE = set(GLOBAL_FIELDS.values())


def _in(methods: list[str]) -> str:
    return "self.method in [" + ", ".join(f"'{m}'" for m in methods) + "]" if methods else "false"


def _unset_or_neutral(expr: str, name: str) -> str:
    """CEL: the field at ``expr`` is unset or holds the value that changes nothing."""
    test = f"!has({expr})"
    if name in registry.NEUTRAL:
        value = registry.NEUTRAL[name]
        # double(): a JSON 2 may reach CEL as an int, and int == double has no overload
        test += f" || {expr} == true" if value is True else f" || double({expr}) == {float(value)}"
    return test


def _method_rules() -> tuple[Rule, ...]:
    """The CEL rules of the registry: base, number of models, required parameters, and global parameters
    the method does not use. A per-model or per-tensor parameter the method does not use is the stage's
    check (trainer.merge.params): CEL messages are fixed text, and that one names the model or override."""
    rows = registry.ROWS
    rules = []
    required = [r.name for r in rows if r.base == "required"]
    if required:
        rules.append(Rule(f"!({_in(required)}) || has(self.base)", "this method needs a base model", ".base",
                          "FieldValueRequired"))
    forbidden = [r.name for r in rows if r.base == "forbidden"]
    if forbidden:
        rules.append(Rule(f"!({_in(forbidden)}) || !has(self.base)", "this method takes no base model", ".base",
                          "FieldValueForbidden"))
    for r in rows:
        count = registry.count_phrase(r)
        needs = [f"parameters.{p}" for p in sorted(r.required) if registry.PARAMS[p].scope == "global"]
        checks = []
        if count and r.min_models == r.max_models:
            checks.append(f"size(self.models) == {r.min_models}")
        elif count:
            checks.append(f"size(self.models) >= {r.min_models}")
            if r.max_models is not None:
                checks.append(f"size(self.models) <= {r.max_models}")
        checks += [f"has(self.{p})" for p in needs]
        if checks:
            what = " and ".join(x for x in (count, *needs) if x)
            rules.append(Rule(f"self.method != '{r.name}' || ({' && '.join(checks)})", f"{r.name} needs {what}",
                              ".models"))
        if r.base_in_models:
            models = f"the {r.max_models} models" if r.max_models == r.min_models else "its models"
            message = (f"{r.name} needs a base that is one of {models}" if r.base == "required" else
                       f"{r.name}'s base must be one of {models}")
            rules.append(Rule(f"self.method != '{r.name}' || !has(self.base) || self.models.exists(m, "
                              f"{_SAME_AS_BASE})", message, ".base"))
    for name, p in registry.PARAMS.items():
        users = registry.accepting(name)
        need = [r.name for r in rows if name in r.required]
        if p.scope == "model" and need:
            rules.append(Rule(f"!({_in(need)}) || has(self.parameters.{name}) || self.models.all(m, has(m.{name}))",
                              f"{', '.join(need)} need a {name} ({p.bounds()}) for every model (per model or "
                              f"parameters.{name})", ".models"))
        only = f"only for {', '.join(users)}" if users else "no method uses it yet"
        if name in _GLOBAL_WIRE:
                rules.append(Rule(f"{_in(users)} || {_unset_or_neutral(f'self.parameters.{name}', name)}",
                              f"unknown parameter for this method ({only})", f".parameters.{name}"))
    return tuple(rules)


class MergeSpec(ApiModel):
    """Merge models tensor by tensor, streaming from safetensors."""

    rules = _method_rules()
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
