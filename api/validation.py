"""Turn a manifest (a dict) into a typed resource, or into a list of errors that each name a field path.

Two passes, in the order the API server applies them: the structural schema (pydantic), then the CEL
rules declared on the models (evaluated with cel-python, the same expressions the CRDs carry).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
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

    _load_cel_parser()
    env = celpy.Environment()
    return env.program(env.compile(expression))


def _load_cel_parser() -> None:
    """Build cel-python's CEL parser with lark's grammar cache, in a private folder.

    cel-python builds its LALR tables from the grammar in every process (0.6 s, a tenth of a small merge
    stage); lark can cache them. The cache is a pickle, so it is never kept in a shared temp folder (lark's
    default), only in the user's own cache folder; without one the parser is built as usual. The arguments
    are cel-python 0.5's own (pinned), so the parser is the one it would build."""
    import re

    import lark
    from celpy import celparser

    if celparser.CELParser.CEL_PARSER is not None:
        return
    cache = _private_cache_file(f"cel-parser-lark{lark.__version__}")
    if cache is None:
        return
    grammar = (Path(celparser.__file__).parent / "cel.lark").read_text()
    celparser.CELParser.CEL_PARSER = lark.Lark(
        grammar, parser="lalr", start="expr", debug=True, g_regex_flags=re.M,
        lexer_callbacks={"IDENT": celparser.CELParser.ambiguous_literals}, propagate_positions=True,
        maybe_placeholders=False, priority="invert", tree_class=lark.Tree, cache=cache)


def _private_cache_file(name: str) -> str | None:
    """A file in $XDG_CACHE_HOME/branchmerge (or ~/.cache/branchmerge), a folder only this user may
    write; None when there is no such folder (e.g. a read-only home in a pod)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "branchmerge"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = root.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            return None
    except (OSError, RuntimeError):  # RuntimeError: no home folder
        return None
    return str(root / f"{name}-py{sys.version_info[0]}{sys.version_info[1]}.pickle")


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
