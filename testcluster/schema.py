"""Structural OpenAPI v3 schemas of CustomResourceDefinitions: pruning, defaulting and validation, the three
steps apiextensions-apiserver runs on every custom resource it decodes (requests and storage reads).

A CRD's ``openAPIV3Schema`` is compiled once into a tree of ``Node`` objects (patterns compiled, CEL rules
compiled by ``testcluster.cel``), so a request walks its object once per step without re-reading the
YAML. Paths in errors use Kubernetes' field-path syntax (``spec.models[0].weight``, ``spec.env[FOO]``).

Emulated: pruning of unknown fields (``x-kubernetes-preserve-unknown-fields``, ``x-kubernetes-embedded-
resource``, ObjectMeta at the root and in embedded resources keeps only its known keys), structural
defaulting (absent fields and non-nullable nulls; defaults are themselves defaulted), null pruning of
non-nullable fields without defaults, validation of type, nullable, enum, minimum/maximum (+exclusive),
multipleOf, minLength/maxLength (in characters, as kube-openapi counts), pattern, minItems/maxItems,
minProperties/maxProperties, required, the formats Kubernetes checks (int32, int64, byte, date, date-time,
uuid), ``x-kubernetes-int-or-string``, ``x-kubernetes-list-type: set|map`` uniqueness, then the
``x-kubernetes-validations`` rules (only when no "blocking" error was found, as the real server does).
Updates ratchet like Kubernetes >= 1.30 (CRDValidationRatcheting): a value unchanged from the old object
(correlated through properties, map keys and list-type=map keys) is not validated again, so an object
stored under an older, looser schema can still have its status written.

Not emulated: ``anyOf/allOf/oneOf/not`` value validation (structural schemas only use them for extra
constraints; our CRDs have none), ``x-kubernetes-map-type``, the CEL cost budget, formats other than the
ones listed (they pass), validation of embedded resources' metadata beyond pruning.
"""
from __future__ import annotations

import base64
import datetime
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from . import cel as celrules
from .store import jcopy

OBJECT_META_FIELDS = frozenset((
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations", "ownerReferences", "finalizers",
    "managedFields"))

# kube-openapi's error kinds → the Status cause reason (k8s.io/apimachinery/pkg/util/validation/field).
REASONS = {"Required value": "FieldValueRequired", "Invalid value": "FieldValueInvalid",
           "Unsupported value": "FieldValueNotSupported", "Too long": "FieldValueTooLong",
           "Too many": "FieldValueTooMany", "Duplicate value": "FieldValueDuplicate",
           "Forbidden": "FieldValueForbidden"}
# A "blocking" error stops CEL evaluation (the rules could see values of the wrong type).
BLOCKING = {"FieldValueRequired", "FieldValueNotSupported", "FieldValueTooLong", "FieldValueTooMany",
            "FieldValueTypeInvalid"}


NO_OLD = object()  # "no correlated old value" (None is a legitimate old value)


@dataclass
class FieldError:
    field: str
    reason: str
    detail: str  # the cause message, e.g. 'Invalid value: 3: spec.x in body should be less than or equal to 2'

    def cause(self) -> dict:
        return {"reason": self.reason, "message": self.detail, "field": self.field}

    def __str__(self) -> str:
        return f"{self.field}: {self.detail}" if self.field else self.detail


def go_repr(value: Any) -> str:
    """How Go's %#v-ish field error formatting shows a value (strings quoted, objects by type)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(type_name(value))


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError(path, "FieldValueInvalid", f"Invalid value: {go_repr(value)}: {detail}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _check_format(fmt: str, value: Any) -> bool:
    try:
        if fmt == "int32":
            return not _is_int(value) or -2**31 <= value < 2**31
        if fmt == "int64":
            return not _is_int(value) or -2**63 <= value < 2**63
        if not isinstance(value, str):
            return True
        if fmt == "byte":
            base64.b64decode(value, validate=True)
        elif fmt == "date":
            datetime.date.fromisoformat(value)
        elif fmt == "date-time":
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        elif fmt == "uuid":
            uuid.UUID(value)
        return True
    except ValueError:
        return False


@dataclass(eq=False)
class Node:
    """One compiled schema node."""
    type: str | None = None
    properties: dict[str, "Node"] = field(default_factory=dict)
    items: "Node | None" = None
    additional: "Node | bool | None" = None
    preserve_unknown: bool = False
    int_or_string: bool = False
    embedded: bool = False
    nullable: bool = False
    has_default: bool = False
    default: Any = None
    enum: list | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_min: bool = False
    exclusive_max: bool = False
    multiple_of: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: re.Pattern | None = None
    pattern_src: str = ""
    min_items: int | None = None
    max_items: int | None = None
    min_props: int | None = None
    max_props: int | None = None
    required: tuple = ()
    format: str = ""
    list_type: str = ""
    map_keys: tuple = ()
    rules: list = field(default_factory=list)  # compiled celrules.Rule
    is_meta: bool = False  # the ObjectMeta of the root or of an embedded resource
    has_rules_below: bool = False
    has_transition_below: bool = False
    has_defaults_below: bool = False

    # ---- pruning --------------------------------------------------------------------------------------

    def prune(self, value: Any, path: str, pruned: list[str]) -> None:
        """Drop unknown fields in place; record their paths (the server warns about them)."""
        if isinstance(value, dict):
            if self.is_meta:
                for key in [k for k in value if k not in OBJECT_META_FIELDS]:
                    del value[key]
                    pruned.append(_join(path, key))
                return
            for key in list(value):
                child = self.properties.get(key)
                if child is not None:
                    child.prune(value[key], _join(path, key), pruned)
                elif self.embedded and key in ("apiVersion", "kind"):
                    continue
                elif isinstance(self.additional, Node):
                    self.additional.prune(value[key], _join(path, key), pruned)
                elif not (self.preserve_unknown or self.additional is True):
                    del value[key]
                    pruned.append(_join(path, key))
        elif isinstance(value, list) and self.items is not None:
            for i, item in enumerate(value):
                self.items.prune(item, f"{path}[{i}]", pruned)

    # ---- defaulting -----------------------------------------------------------------------------------

    def apply_defaults(self, value: Any) -> None:
        """Fill absent (and non-nullable null) fields with their defaults, in place, recursively."""
        if not self.has_defaults_below:
            return
        if isinstance(value, dict):
            for key, child in self.properties.items():
                if child.has_default and (key not in value or (value[key] is None and not child.nullable)):
                    value[key] = jcopy(child.default)
                elif key in value and value[key] is None and not child.nullable:
                    del value[key]  # a non-nullable null without a default is pruned before defaulting
            for key, item in value.items():
                child = self.properties.get(key)
                if child is not None:
                    child.apply_defaults(item)
                elif isinstance(self.additional, Node):
                    self.additional.apply_defaults(item)
        elif isinstance(value, list) and self.items is not None:
            for i, item in enumerate(value):
                if item is None and self.items.has_default and not self.items.nullable:
                    value[i] = item = jcopy(self.items.default)
                self.items.apply_defaults(item)

    # ---- validation -----------------------------------------------------------------------------------

    def validate(self, value: Any, path: str, errors: list[FieldError], old: Any = NO_OLD) -> None:
        """``old``: the correlated old value on updates; an unchanged value is not re-validated (ratcheting)."""
        if old is not NO_OLD and value == old:
            return
        if value is None:
            if not self.nullable and self.type is not None:
                errors.append(FieldError(path, "FieldValueTypeInvalid",
                                         f'Invalid value: "null": {path} in body must be of type {self.type}: "null"'))
            return
        if self.int_or_string:
            if not (isinstance(value, str) or _is_int(value)):
                errors.append(FieldError(path, "FieldValueTypeInvalid",
                                         f"Invalid value: {go_repr(value)}: {path} in body must be of type "
                                         f"integer,string: {json.dumps(type_name(value))}"))
                return
        elif self.type is not None and not self._type_ok(value):
            errors.append(FieldError(path, "FieldValueTypeInvalid",
                                     f"Invalid value: {json.dumps(type_name(value))}: {path} in body must be of "
                                     f"type {self.type}: {json.dumps(type_name(value))}"))
            return
        if self.enum is not None and value not in self.enum:
            supported = ", ".join(json.dumps(e) for e in self.enum)
            errors.append(FieldError(path, "FieldValueNotSupported",
                                     f"Unsupported value: {go_repr(value)}: supported values: {supported}"))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self._validate_number(value, path, errors)
        elif isinstance(value, str):
            self._validate_string(value, path, errors)
        elif isinstance(value, list):
            self._validate_list(value, path, errors, old)
        elif isinstance(value, dict):
            self._validate_object(value, path, errors, old)

    def _type_ok(self, value: Any) -> bool:
        t = self.type
        if t == "object":
            return isinstance(value, dict)
        if t == "array":
            return isinstance(value, list)
        if t == "string":
            return isinstance(value, str)
        if t == "boolean":
            return isinstance(value, bool)
        if t == "integer":
            return _is_int(value)
        if t == "number":
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        return True

    def _validate_number(self, value: float, path: str, errors: list[FieldError]) -> None:
        if self.minimum is not None:
            if self.exclusive_min and value <= self.minimum:
                errors.append(invalid(path, value, f"{path} in body should be greater than {_num(self.minimum)}"))
            elif not self.exclusive_min and value < self.minimum:
                errors.append(invalid(path, value, f"{path} in body should be greater than or equal to "
                                                   f"{_num(self.minimum)}"))
        if self.maximum is not None:
            if self.exclusive_max and value >= self.maximum:
                errors.append(invalid(path, value, f"{path} in body should be less than {_num(self.maximum)}"))
            elif not self.exclusive_max and value > self.maximum:
                errors.append(invalid(path, value, f"{path} in body should be less than or equal to "
                                                   f"{_num(self.maximum)}"))
        if self.multiple_of:
            q = value / self.multiple_of
            if not math.isclose(q, round(q), rel_tol=0, abs_tol=1e-9):
                errors.append(invalid(path, value, f"{path} in body should be a multiple of {_num(self.multiple_of)}"))
        if self.format and not _check_format(self.format, value):
            errors.append(invalid(path, value, f"{path} in body must be of type {self.format}: {go_repr(value)}"))

    def _validate_string(self, value: str, path: str, errors: list[FieldError]) -> None:
        if self.max_length is not None and len(value) > self.max_length:
            errors.append(FieldError(path, "FieldValueTooLong",
                                     f"Too long: may not be more than {self.max_length} bytes"))
        if self.min_length is not None and len(value) < self.min_length:
            errors.append(invalid(path, value, f"{path} in body should be at least {self.min_length} chars long"))
        if self.pattern is not None and not self.pattern.search(value):
            errors.append(invalid(path, value, f"{path} in body should match '{self.pattern_src}'"))
        if self.format and not _check_format(self.format, value):
            errors.append(invalid(path, value, f"{path} in body must be of type {self.format}: {go_repr(value)}"))

    def _validate_list(self, value: list, path: str, errors: list[FieldError], old: Any = NO_OLD) -> None:
        if self.max_items is not None and len(value) > self.max_items:
            errors.append(FieldError(path, "FieldValueTooMany",
                                     f"Too many: {len(value)}: must have at most {self.max_items} items"))
        if self.min_items is not None and len(value) < self.min_items:
            errors.append(invalid(path, value, f"{path} in body should have at least {self.min_items} items"))
        if self.items is not None:
            olds = {}
            if self.list_type == "map" and self.map_keys and isinstance(old, list):
                olds = {self.map_key(o): o for o in old if isinstance(o, dict)}
            for i, item in enumerate(value):
                prev = olds.get(self.map_key(item), NO_OLD) if olds and isinstance(item, dict) else NO_OLD
                self.items.validate(item, f"{path}[{i}]", errors, prev)

    def map_key(self, item: dict) -> str:
        return json.dumps([item.get(k) for k in self.map_keys], sort_keys=True)

    def list_set_map_errors(self, value: list, path: str) -> list[FieldError]:
        """``x-kubernetes-list-type`` set/map uniqueness (checked separately: updates ratchet it)."""
        out: list[FieldError] = []
        if self.list_type == "set":
            seen: list = []
            for i, item in enumerate(value):
                if item in seen:
                    out.append(FieldError(f"{path}[{i}]", "FieldValueDuplicate", f"Duplicate value: {go_repr(item)}"))
                else:
                    seen.append(item)
        elif self.list_type == "map" and self.map_keys:
            keys: set = set()
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                key = tuple(json.dumps(item.get(k), sort_keys=True) for k in self.map_keys)
                if key in keys:
                    shown = {k: item.get(k) for k in self.map_keys}
                    out.append(FieldError(f"{path}[{i}]", "FieldValueDuplicate",
                                          f"Duplicate value: {json.dumps(shown, separators=(',', ':'))}"))
                keys.add(key)
        return out

    def _validate_object(self, value: dict, path: str, errors: list[FieldError], old: Any = NO_OLD) -> None:
        if self.is_meta:
            return  # ObjectMeta is validated by the generic metadata rules
        for key in self.required:
            if key not in value:
                errors.append(FieldError(_join(path, key), "FieldValueRequired", "Required value"))
        if self.max_props is not None and len(value) > self.max_props:
            errors.append(FieldError(path, "FieldValueTooMany",
                                     f"Too many: {len(value)}: must have at most {self.max_props} items"))
        if self.min_props is not None and len(value) < self.min_props:
            errors.append(invalid(path, value, f"{path} in body should have at least {self.min_props} properties"))
        olds = old if isinstance(old, dict) else {}
        for key, item in value.items():
            child = self.properties.get(key)
            if child is None and isinstance(self.additional, Node):
                child = self.additional
            if child is not None:
                child.validate(item, _join(path, key), errors, olds.get(key, NO_OLD))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


META = Node(type="object", is_meta=True)


def compile_node(doc: dict, *, root: bool = False, path: str = "") -> Node:
    """Compile one (structural) schema node and its children."""
    node = Node(type=doc.get("type"))
    node.int_or_string = bool(doc.get("x-kubernetes-int-or-string"))
    node.preserve_unknown = bool(doc.get("x-kubernetes-preserve-unknown-fields"))
    node.embedded = bool(doc.get("x-kubernetes-embedded-resource"))
    node.nullable = bool(doc.get("nullable"))
    if "default" in doc:
        node.has_default, node.default = True, doc["default"]
    node.enum = doc.get("enum")
    node.minimum, node.maximum = doc.get("minimum"), doc.get("maximum")
    node.exclusive_min = bool(doc.get("exclusiveMinimum"))
    node.exclusive_max = bool(doc.get("exclusiveMaximum"))
    node.multiple_of = doc.get("multipleOf")
    node.min_length, node.max_length = doc.get("minLength"), doc.get("maxLength")
    if "pattern" in doc:
        node.pattern_src = doc["pattern"]
        node.pattern = re.compile(doc["pattern"])
    node.min_items, node.max_items = doc.get("minItems"), doc.get("maxItems")
    node.min_props, node.max_props = doc.get("minProperties"), doc.get("maxProperties")
    node.required = tuple(doc.get("required") or ())
    node.format = doc.get("format", "")
    node.list_type = doc.get("x-kubernetes-list-type", "")
    node.map_keys = tuple(doc.get("x-kubernetes-list-map-keys") or ())
    for key, child in (doc.get("properties") or {}).items():
        if root and key == "metadata":
            node.properties[key] = META  # ObjectMeta: only its known keys survive, the schema adds nothing
            continue
        node.properties[key] = compile_node(child, path=_join(path, key))
    if isinstance(doc.get("items"), dict):
        node.items = compile_node(doc["items"], path=path + "[*]")
    extra = doc.get("additionalProperties")
    if isinstance(extra, dict):
        node.additional = compile_node(extra, path=path + "[*]")
    elif extra is True:
        node.additional = True
    if node.embedded:
        node.properties.setdefault("metadata", META)
    if root:
        for key in ("apiVersion", "kind"):
            node.properties.setdefault(key, Node(type="string"))
        node.properties.setdefault("metadata", META)
    node.rules = [celrules.Rule.compile(rule, node) for rule in doc.get("x-kubernetes-validations") or ()]
    children = list(node.properties.values()) + [c for c in (node.items, node.additional) if isinstance(c, Node)]
    node.has_rules_below = bool(node.rules) or any(c.has_rules_below for c in children)
    node.has_transition_below = any(r.transition for r in node.rules) or any(c.has_transition_below
                                                                             for c in children)
    node.has_defaults_below = any(c.has_default or c.has_defaults_below for c in children)
    return node


class Schema:
    """A CRD version's compiled schema: ``prune`` → ``default`` → ``validate`` (+ CEL)."""

    def __init__(self, open_api_v3: dict):
        self.root = compile_node(open_api_v3 or {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                 root=True)

    def prune(self, obj: dict) -> list[str]:
        pruned: list[str] = []
        self.root.prune(obj, "", pruned)
        return pruned

    def default(self, obj: dict) -> dict:
        self.root.apply_defaults(obj)
        return obj

    def validate(self, obj: dict, old: dict | None = None) -> list[FieldError]:
        errors: list[FieldError] = []
        self.root.validate(obj, "", errors, old if old is not None else NO_OLD)
        errors += _list_errors(self.root, obj, old, "")
        if self.root.has_rules_below:
            if any(e.reason in BLOCKING for e in errors):
                errors.append(FieldError("", "FieldValueInvalid", "Invalid value: \"null\": some validation rules "
                                         "were not checked because the object was invalid; correct the existing "
                                         "errors to complete validation"))
            else:
                celrules.validate_tree(self.root, obj, old, "", errors)
        return errors


def _list_errors(node: Node, value: Any, old: Any, path: str) -> list[FieldError]:
    """Set/map uniqueness, ratcheted: an update whose old object already broke it is not checked."""
    out: list[FieldError] = []
    if isinstance(value, dict):
        for key, item in value.items():
            child = node.properties.get(key)
            if child is None and isinstance(node.additional, Node):
                child = node.additional
            if child is not None and child is not META:
                out += _list_errors(child, item, old.get(key) if isinstance(old, dict) else None, _join(path, key))
    elif isinstance(value, list):
        if node.list_type in ("set", "map"):
            if not (isinstance(old, list) and node.list_set_map_errors(old, path)):
                out += node.list_set_map_errors(value, path)
        if node.items is not None and (node.items.properties or node.items.items is not None):
            for i, item in enumerate(value):
                out += _list_errors(node.items, item, None, f"{path}[{i}]")
    return out
