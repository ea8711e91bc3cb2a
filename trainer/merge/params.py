"""Method parameters: reject the ones a method does not use, resolve per-tensor values (overrides)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType

from ...api.merge import MergeSpec
from ..errors import InvalidInput
from .methods.base import TensorParams

# spec field (python name) -> parameter name the methods declare in ACCEPTS
_GLOBAL_FIELDS = {"normalize": "normalize", "lambda_": "lambda", "rescale": "rescale", "density": "density",
                  "t": "t"}
_MODEL_FIELDS = {"weight": "weight", "density": "density"}
_OVERRIDE_FIELDS = {"t": "t", "density": "density", "weight_scale": "weight_scale", "lambda_": "lambda"}


# What an unset parameter means. A spec stored by an older CRD that defaulted these (or written out in
# full by a tool) carries them for every method: the neutral value is accepted where a method ignores it.
NEUTRAL = {"normalize": True, "lambda_": 1.0, "rescale": True, "weight": 1.0}


def _effective(value, field: str) -> bool:
    """Whether a parameter set to ``value`` would change anything (None and the neutral value do not)."""
    return value is not None and not (field in NEUTRAL and value == NEUTRAL[field])


def _wire(name: str) -> str:
    return {"lambda_": "lambda", "weight_scale": "weightScale"}.get(name, name)


def check_parameters(spec: MergeSpec, method: ModuleType) -> None:
    """InvalidInput naming the field when a parameter is set that ``method`` does not use."""
    accepts = method.ACCEPTS
    hint = f"(method {method.NAME} uses: {', '.join(sorted(accepts)) or 'no parameters'})"
    for field in spec.parameters.model_fields_set & _GLOBAL_FIELDS.keys():
        if _GLOBAL_FIELDS[field] not in accepts and _effective(getattr(spec.parameters, field), field):
            raise InvalidInput(f"spec.parameters.{_wire(field)}: unknown parameter for {method.NAME} {hint}")
    for i, model in enumerate(spec.models):
        for field in model.model_fields_set & _MODEL_FIELDS.keys():
            if _MODEL_FIELDS[field] not in accepts and _effective(getattr(model, field), field):
                raise InvalidInput(f"spec.models[{i}].{field}: unknown parameter for {method.NAME} {hint}")
    for i, override in enumerate(spec.parameters.overrides):
        for field in override.model_fields_set & _OVERRIDE_FIELDS.keys():
            if _OVERRIDE_FIELDS[field] not in accepts and getattr(override, field) is not None:
                raise InvalidInput(f"spec.parameters.overrides[{i}].{_wire(field)}: unknown parameter for "
                                   f"{method.NAME} {hint}")
        try:
            re.compile(override.tensors)
        except re.error as err:
            raise InvalidInput(f"spec.parameters.overrides[{i}].tensors: bad regular expression: {err}") from None


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

    def for_tensor(self, name: str) -> TensorParams:
        match = next((i for i, (rx, _) in enumerate(self._patterns) if rx.search(name)), -1)
        if match not in self._cache:
            self._cache[match] = self._build(self._patterns[match][1] if match >= 0 else None)
        return self._cache[match]

    def _build(self, override) -> TensorParams:
        p = self.spec.parameters
        models = [self.spec.models[i] for i in self.model_indexes]
        scale = override.weight_scale if override is not None and override.weight_scale is not None else 1.0
        density_override = override.density if override is not None else None
        return TensorParams(
            weights=tuple(_or(m.weight, NEUTRAL['weight']) * scale for m in models),
            densities=tuple(density_override if density_override is not None else
                            (m.density if m.density is not None else p.density) for m in models),
            t=override.t if override is not None and override.t is not None else p.t,
            lambda_=override.lambda_ if override is not None and override.lambda_ is not None else _or(p.lambda_, NEUTRAL['lambda_']),
            normalize=_or(p.normalize, NEUTRAL['normalize']),
            rescale=_or(p.rescale, NEUTRAL['rescale']),
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
