"""Method parameters: reject the ones a method does not use, resolve per-tensor values (overrides)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType

from ...api import merge_methods as registry
from ...api.merge import GLOBAL_FIELDS, MODEL_FIELDS, OVERRIDE_FIELDS, MergeSpec
from ..errors import InvalidInput
from .methods.base import TensorParams


def _effective(value, wire: str) -> bool:
    """Whether a parameter set to ``value`` would change anything (None and the neutral value do not:
    older CRDs defaulted some parameters into every spec, see registry.NEUTRAL)."""
    return value is not None and not (wire in registry.NEUTRAL and value == registry.NEUTRAL[wire])


def check_parameters(spec: MergeSpec, method: ModuleType | None = None) -> None:
    """InvalidInput naming the field when the spec breaks its method's registry row: a parameter the
    method does not use, a required one missing, the wrong number of models, or a bad epsilon."""
    row = registry.row(spec.method)
    accepts = row.parameters
    hint = f"(method {row.name} uses: {', '.join(sorted(accepts)) or 'no parameters'})"
    for field, wire in GLOBAL_FIELDS.items():
        if field in spec.parameters.model_fields_set and wire not in accepts and \
                _effective(getattr(spec.parameters, field), wire):
            raise InvalidInput(f"spec.parameters.{wire}: unknown parameter for {row.name} {hint}")
    for i, model in enumerate(spec.models):
        for field, wire in MODEL_FIELDS.items():
            if field in model.model_fields_set and wire not in accepts and _effective(getattr(model, field), wire):
                raise InvalidInput(f"spec.models[{i}].{wire}: unknown parameter for {row.name} {hint}")
    for i, override in enumerate(spec.parameters.overrides):
        for field, wire in OVERRIDE_FIELDS.items():
            if registry.OVERRIDE_NEEDS[wire] not in accepts and getattr(override, field) is not None:
                raise InvalidInput(f"spec.parameters.overrides[{i}].{wire}: unknown parameter for "
                                   f"{row.name} {hint}")
        try:
            re.compile(override.tensors)
        except re.error as err:
            raise InvalidInput(f"spec.parameters.overrides[{i}].tensors: bad regular expression: {err}") from None
    count = registry.count_phrase(row)
    if count and not (row.min_models <= len(spec.models) <= (row.max_models or len(spec.models))):
        raise InvalidInput(f"spec.models: {row.name} needs {count}, got {len(spec.models)}")
    if row.base == "required" and spec.base is None:
        raise InvalidInput(f"spec.base: method {row.name} needs a base model")
    if row.base == "forbidden" and spec.base is not None:
        raise InvalidInput(f"spec.base: method {row.name} takes no base model")
    for name in sorted(row.required):
        scope = registry.PARAMS[name].scope
        if scope == "global" and getattr(spec.parameters, _python(GLOBAL_FIELDS, name)) is None:
            raise InvalidInput(f"spec.parameters.{name}: {row.name} needs it")
        if scope == "model" and getattr(spec.parameters, _python(GLOBAL_FIELDS, name)) is None:
            for i, model in enumerate(spec.models):
                if getattr(model, _python(MODEL_FIELDS, name)) is None:
                    raise InvalidInput(f"spec.models[{i}].{name}: {row.name} needs a {name} for every model "
                                       f"(per model or spec.parameters.{name})")
    if "epsilon" in accepts:
        _check_epsilon(spec, row)


def _python(fields: dict[str, str], wire: str) -> str:
    return next(n for n, w in fields.items() if w == wire)


def _check_epsilon(spec: MergeSpec, row: registry.MethodRow) -> None:
    """della*: every keep probability, density +/- epsilon, must lie strictly inside (0, 1) (density 1
    keeps everything and draws nothing)."""
    overridden = [o.density for o in spec.parameters.overrides if o.density is not None]
    for i, model in enumerate(spec.models):
        epsilon = _or(model.epsilon, _or(spec.parameters.epsilon, row.default("epsilon")))
        for density in [_or(model.density, spec.parameters.density)] + overridden:
            if density is not None and density < 1 and not (0 < density - epsilon and density + epsilon < 1):
                field = ("epsilon" if model.epsilon is not None or spec.parameters.epsilon is not None
                         else "density")
                raise InvalidInput(f"spec.models[{i}].{field}: {row.name} needs density - epsilon > 0 and "
                                   f"density + epsilon < 1, got density {density:g} and epsilon {epsilon:g}")


def _or(value, default):
    """The documented default of a parameter left unset (they are not CRD defaults: see MergeParameters)."""
    return default if value is None else value


@dataclass
class ParamResolver:
    """Per-tensor parameters for the non-anchor models (``model_indexes`` into spec.models)."""

    spec: MergeSpec
    model_indexes: list[int]

    def __post_init__(self) -> None:
        self._patterns = [(re.compile(o.tensors), o) for o in self.spec.parameters.overrides]
        self._cache: dict[int, TensorParams] = {}
        self._row = registry.row(self.spec.method)

    def for_tensor(self, name: str) -> TensorParams:
        match = next((i for i, (rx, _) in enumerate(self._patterns) if rx.search(name)), -1)
        if match not in self._cache:
            self._cache[match] = self._build(self._patterns[match][1] if match >= 0 else None)
        return self._cache[match]

    def _default(self, wire: str):
        return self._row.default(wire)

    def _build(self, override) -> TensorParams:
        p = self.spec.parameters
        models = [self.spec.models[i] for i in self.model_indexes]
        scale = override.weight_scale if override is not None and override.weight_scale is not None else 1.0
        density_override = override.density if override is not None else None

        def per_model(field: str) -> tuple:  # the model's value, else spec.parameters', else the default
            return tuple(_or(getattr(m, field), _or(getattr(p, field), self._default(field))) for m in models)

        return TensorParams(
            weights=tuple(_or(m.weight, self._default("weight")) * scale for m in models),
            densities=tuple(density_override if density_override is not None else
                            (m.density if m.density is not None else p.density) for m in models),
            t=override.t if override is not None and override.t is not None else p.t,
            lambda_=(override.lambda_ if override is not None and override.lambda_ is not None
                     else _or(p.lambda_, self._default("lambda"))),
            normalize=_or(p.normalize, self._default("normalize")),
            rescale=_or(p.rescale, self._default("rescale")),
            gammas=per_model("gamma"),
            epsilons=per_model("epsilon"),
            select_topk=_or(p.select_topk, self._default("selectTopk")),
            nuslerp_flatten=_or(p.nuslerp_flatten, self._default("nuslerpFlatten")),
            nuslerp_row_wise=_or(p.nuslerp_row_wise, self._default("nuslerpRowWise")),
            normalize_weights=_or(p.normalize_weights, self._default("normalizeWeights")),
            eps=_or(p.eps, self._default("eps")),
            max_iter=_or(p.max_iter, self._default("maxIter")),
            tol=_or(p.tol, self._default("tol")),
        )


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, '1000' -> 1000."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m or (m.group(2) or "").upper() not in _UNITS:
        raise InvalidInput(f"spec.outShardSize: cannot parse {text!r} (e.g. 5GB, 500MiB)")
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size < 1:
        raise InvalidInput(f"spec.outShardSize: must be at least 1 byte, got {text!r}")
    return size
