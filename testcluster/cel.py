"""``x-kubernetes-validations`` rules, evaluated like apiextensions-apiserver does, on the Rust-backed ``cel``
package (PyPI ``common-expression-language``); an implementation independent of the API package's
cel-python checks.

What the real server does and this module does too:
- each rule runs at its schema node with ``self`` bound to the value there (only present values: a rule
  on an absent optional field does not run); at the root, ``self.metadata`` exposes only ``name`` and
  ``generateName``;
- values are typed by the schema before evaluation: ``type: number`` fields are doubles even when the
  JSON says ``1`` (so ``self.weight * 1.5`` works and ``self.weight == 1`` compares numerically);
- transition rules (those referring to ``oldSelf``) run only on update and only where the old value can
  be correlated: object properties, map values by key, ``x-kubernetes-list-type: map`` items by their keys;
- a false rule reports ``message`` (or ``messageExpression``'s string, or ``failed rule: <rule>``) at the
  node's path plus ``fieldPath``, with the rule's ``reason`` (FieldValueInvalid by default,
  FieldValueRequired, FieldValueForbidden, FieldValueDuplicate); an evaluation error (e.g. ``no such
  key``) is reported as Invalid at the node;
- programs are compiled once per CRD (``Rule.compile``) and cached.

Kubernetes CEL libraries emulated narrowly on top of the package's own (which has ``has()``, macros
``all/exists/exists_one/map/filter``, ``size``, ``matches``, ``contains/startsWith/endsWith``,
``duration``/``timestamp``): the string extension (``lowerAscii``, ``upperAscii``, ``trim``, ``split``,
``join``, ``replace``, ``substring``, ``charAt``, ``indexOf``, ``lastIndexOf`` from ``cel.stdlib``), the
list library's ``isSorted``, ``sum``, ``min``, ``max``, regex ``find``/``findAll``, and ``quantity()``:
here a quantity is its value as a number, so ``quantity(a).isLessThan(quantity(b))``,
``compareTo``, ``asInteger``, ``asApproximateFloat``, ``add``, ``sub``, ``isInteger`` work, and
``isQuantity``.

Not emulated: the cost budget and cost estimation, optional types (``self.?x``, ``optionalOldSelf``;
the package cannot parse ``.?``), ``format: date-time``/``duration`` fields as CEL timestamp/duration
values (they stay strings), the ``url``, ``ip``/``cidr``, ``format`` and ``authz`` libraries, and
``x-kubernetes-validations`` on the metadata of embedded resources.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import cel as _cel
from cel import stdlib as _stdlib

if TYPE_CHECKING:
    from .schema import FieldError, Node

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$")
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": Decimal("1e-9"),
           "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "P": 10**15, "E": 10**18}


def parse_quantity(text: str) -> float:
    match = _QUANTITY.match(text.strip())
    if not match:
        raise ValueError(f"quantities must match the regular expression '{_QUANTITY.pattern}'")
    number, suffix = Decimal(match.group(1)), match.group(2)
    if suffix and suffix[0] in "eE" and len(suffix) > 1:
        value = number * Decimal(10) ** int(suffix[1:])
    else:
        value = number * Decimal(_SUFFIX[suffix]) if suffix else number
    return int(value) if value == value.to_integral_value() else float(value)


def _is_sorted(items: list) -> bool:
    return all(a <= b for a, b in zip(items, items[1:]))


def _find(text: str, pattern: str) -> str:
    match = re.search(pattern, text)
    return match.group(0) if match else ""


def _compare(a, b) -> int:
    return (a > b) - (a < b)


EXTENSIONS: dict[str, Any] = {
    **_stdlib.EXTENSIONS["strings"],
    "isSorted": _is_sorted,
    "sum": lambda items: sum(items),
    "min": lambda items: min(items),
    "max": lambda items: max(items),
    "find": _find,
    "findAll": lambda text, pattern, *limit: re.findall(pattern, text)[: limit[0] if limit else None],
    "quantity": parse_quantity,
    "isQuantity": lambda text: bool(_QUANTITY.match(text.strip())),
    "isLessThan": lambda a, b: a < b,
    "isGreaterThan": lambda a, b: a > b,
    "compareTo": _compare,
    "asInteger": lambda a: int(a),
    "asApproximateFloat": lambda a: float(a),
    "isInteger": lambda a: float(a).is_integer(),
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
}

_REASON_PREFIX = {"FieldValueRequired": "Required value", "FieldValueForbidden": "Forbidden",
                  "FieldValueDuplicate": "Duplicate value"}


def context(variables: dict, functions: bool) -> Any:
    """One evaluation environment per schema node: the package converts ``self`` once per Context, so the
    node's rules share it (5x cheaper than a dict per rule)."""
    ctx = _cel.Context()
    if functions:
        for name, func in EXTENSIONS.items():
            ctx.add_function(name, func)
    ctx.update(variables)
    return ctx


@dataclass
class Program:
    source: str
    program: Any
    needs_context: bool

    @classmethod
    def compile(cls, source: str) -> "Program":
        program = _cel.compile(source)
        return cls(source, program, bool(set(program.functions()) & set(EXTENSIONS)))

    def run(self, env: Any) -> Any:
        return self.program.execute(env)


def _error_text(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"no such key: {err.args[0] if err.args else ''}"
    return str(err).split("\n")[0]


@dataclass
class Rule:
    rule: str
    program: Program | None
    compile_error: str
    message: str
    message_expression: Program | None
    reason: str
    field_path: str
    transition: bool
    node_type: str

    @classmethod
    def compile(cls, doc: dict, node: "Node") -> "Rule":
        source = doc["rule"]
        program, error = None, ""
        try:
            program = Program.compile(source)
        except (ValueError, RuntimeError) as err:  # the real server rejects such a CRD; we report per object
            error = _error_text(err)
        expression = None
        if doc.get("messageExpression"):
            try:
                expression = Program.compile(doc["messageExpression"])
            except (ValueError, RuntimeError):
                expression = None
        transition = program is not None and "oldSelf" in program.program.variables()
        return cls(source, program, error, doc.get("message", ""), expression,
                   doc.get("reason", "FieldValueInvalid"), doc.get("fieldPath", ""), transition,
                   node.type or ("object" if node.properties else "string"))

    @property
    def needs_functions(self) -> bool:
        return any(p is not None and p.needs_context for p in (self.program, self.message_expression))

    def check(self, env: Any, path: str, errors: list["FieldError"]) -> None:
        """Evaluate against ``env`` (a Context holding self, and oldSelf when this is a transition rule)."""
        from .schema import FieldError

        variables = env
        if self.program is None:
            errors.append(FieldError(path, "FieldValueInvalid", f"Invalid value: {json.dumps(self.node_type)}: "
                                     f"compilation failed: {self.compile_error}"))
            return
        try:
            result = self.program.run(variables)
        except Exception as err:  # the package raises KeyError/TypeError/RuntimeError/ValueError
            errors.append(FieldError(path, "FieldValueInvalid", f"Invalid value: {json.dumps(self.node_type)}: "
                                     f"{_error_text(err)} evaluating rule: {self.rule}"))
            return
        if result is True:
            return
        if result is not False:
            errors.append(FieldError(path, "FieldValueInvalid", f"Invalid value: {json.dumps(self.node_type)}: "
                                     f"rule did not evaluate to a bool: {self.rule}"))
            return
        message = self.message or f"failed rule: {self.rule}"
        if self.message_expression is not None:
            try:
                text = self.message_expression.run(variables)
                if isinstance(text, str) and text.strip() and "\n" not in text:
                    message = text
            except Exception:  # a failing messageExpression falls back to message
                pass
        field = path + self.field_path if self.field_path else path
        prefix = _REASON_PREFIX.get(self.reason)
        if self.reason == "FieldValueDuplicate":
            detail = f"Duplicate value: {json.dumps(message)}"
        elif prefix:
            detail = f"{prefix}: {message}"
        else:
            detail = f"Invalid value: {json.dumps(self.node_type)}: {message}"
        errors.append(FieldError(field, self.reason if self.reason in (
            "FieldValueRequired", "FieldValueForbidden", "FieldValueDuplicate") else "FieldValueInvalid", detail))


# ---- typing values by the schema ------------------------------------------------------------------------

def typed(node: "Node", value: Any) -> Any:
    """The value as CEL sees it: numbers declared ``type: number`` become doubles."""
    if value is None:
        return None
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            child = node.properties.get(key) if node.properties else None
            if child is None and not isinstance(node.additional, bool) and node.additional is not None:
                child = node.additional
            out[key] = typed(child, item) if child is not None else item
        return out
    if isinstance(value, list):
        return [typed(node.items, item) for item in value] if node.items is not None else value
    if node.type == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _root_view(value: dict) -> dict:
    out = dict(value)
    meta = value.get("metadata")
    if isinstance(meta, dict):
        out["metadata"] = {k: meta[k] for k in ("name", "generateName") if k in meta}
    return out


def validate_tree(root: "Node", obj: Any, old: Any, path: str, errors: list["FieldError"]) -> None:
    """Run every rule of the schema tree against ``obj`` (and ``old`` for transition rules and ratcheting:
    rules without ``oldSelf`` are not evaluated on values unchanged from the old object)."""
    _walk(root, obj, old, old is not None, path, errors, root=True)


def _walk(node: "Node", value: Any, old: Any, has_old: bool, path: str, errors: list["FieldError"],
          root: bool = False) -> None:
    if not node.has_rules_below or value is None:
        return
    unchanged = has_old and value == old
    if unchanged and not node.has_transition_below:
        return  # ratcheting: nothing below can report anything new
    rules = [r for r in node.rules if (r.transition and has_old) or (not r.transition and not unchanged)]
    if rules:
        variables = {"self": _root_view(typed(node, value)) if root and isinstance(value, dict) else typed(node, value)}
        if any(r.transition for r in rules):
            variables["oldSelf"] = _root_view(typed(node, old)) if root and isinstance(old, dict) else typed(node, old)
        env = context(variables, any(r.needs_functions for r in rules))
        for rule in rules:
            rule.check(env, path, errors)
    if isinstance(value, dict):
        for key, item in value.items():
            child = node.properties.get(key)
            if child is None and isinstance(node.additional, type(node)):
                child = node.additional
            if child is None or not child.has_rules_below:
                continue
            old_has = has_old and isinstance(old, dict) and key in old
            _walk(child, item, old[key] if old_has else None, old_has, f"{path}.{key}" if path else key, errors)
    elif isinstance(value, list) and node.items is not None and node.items.has_rules_below:
        olds: dict = {}
        if has_old and isinstance(old, list) and node.list_type == "map" and node.map_keys:
            olds = {node.map_key(o): o for o in old if isinstance(o, dict)}
        for i, item in enumerate(value):
            key = node.map_key(item) if olds and isinstance(item, dict) else None
            found = key is not None and key in olds
            _walk(node.items, item, olds[key] if found else None, found, f"{path}[{i}]", errors)
