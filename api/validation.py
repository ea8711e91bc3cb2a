"""Turn a manifest (a dict) into a typed resource, or into a list of errors that each name a field path.

Two passes, in the order the API server applies them: the structural schema (pydantic), then the CEL
rules declared on the models (evaluated with cel-python, the same expressions the CRDs carry).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ValidationError

from .base import Rule, walk
from .common import API_VERSION
from .resources import KIND_INFO, CustomResource


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidManifest(ValueError):
    """A manifest broke the schema or a rule; ``errors`` lists every problem found."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


def format_path(loc: tuple[Any, ...] | list[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


# pydantic's wording, shortened to what kubectl users read in API server errors.
_MESSAGES = {
    "missing": "required",
    "extra_forbidden": "unknown field",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "string_pattern_mismatch": "must match {pattern}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must be at least {min_length} character(s)",
    "string_too_long": "must be at most {max_length} character(s)",
}


def _number(value):
    """0.0 -> 0 in messages, as users wrote it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _schema_errors(err: ValidationError) -> list[FieldError]:
    errors = []
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        # Tagged-union and function-wrapper levels are not part of the document's path.
        loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
        template = _MESSAGES.get(e["type"])
        ctx = {k: _number(v) for k, v in (e.get("ctx") or {}).items()}
        message = template.format(**ctx) if template else e["msg"]
        if e["type"] == "literal_error":
            message = "must be one of " + e["ctx"]["expected"].replace(" or ", ", ")
        errors.append(FieldError(format_path(loc), message))
    return errors


@lru_cache(maxsize=None)
def _program(expression: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(expression))


def evaluate_rule(rule: Rule, obj: dict) -> bool:
    """Evaluate one CEL rule with ``self`` bound to ``obj`` (a wire-form dict)."""
    import celpy

    result = _program(rule.rule).evaluate({"self": celpy.json_to_cel(obj)})
    if isinstance(result, Exception):  # cel-python returns CELEvalError values instead of raising
        raise result
    return bool(result)


def rule_errors(resource: BaseModel, root: str = "") -> list[FieldError]:
    errors = []
    for path, obj in walk(resource, root):
        if not obj.rules:
            continue
        wire = obj.wire()
        for rule in obj.rules:
            if not evaluate_rule(rule, wire):
                errors.append(FieldError(path + (rule.field or ""), rule.message))
    return errors


def parse_resource(doc: Any) -> CustomResource:
    """Validate one manifest document; raises InvalidManifest listing every error."""
    if not isinstance(doc, dict):
        raise InvalidManifest([FieldError("", f"a manifest must be a mapping, got {type(doc).__name__}")])
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if api_version != API_VERSION:
        raise InvalidManifest([FieldError("apiVersion", f"must be {API_VERSION}, got {api_version!r}")])
    if kind not in KIND_INFO:
        raise InvalidManifest([FieldError("kind", f"must be one of {', '.join(KIND_INFO)}, got {kind!r}")])
    try:
        resource = KIND_INFO[kind].model.model_validate(doc)
    except ValidationError as err:
        raise InvalidManifest(_schema_errors(err)) from None
    errors = rule_errors(resource.spec, "spec")  # type: ignore[attr-defined]
    if errors:
        raise InvalidManifest(errors)
    return resource


def parse_spec(kind: str, spec: dict, path: str = "spec") -> Any:
    """Validate a bare spec of ``kind`` (the stage entry point reads resolved specs)."""
    model = KIND_INFO[kind].model.model_fields["spec"].annotation
    try:
        parsed = model.model_validate(spec)
    except ValidationError as err:
        raise InvalidManifest([FieldError(f"{path}.{e.path}" if e.path else path, e.message)
                               for e in _schema_errors(err)]) from None
    errors = rule_errors(parsed, path)
    if errors:
        raise InvalidManifest(errors)
    return parsed
