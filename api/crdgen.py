"""Generate the CustomResourceDefinitions from the API models.

pydantic's JSON Schema is rewritten into a Kubernetes *structural* OpenAPI v3 schema: references inlined,
``Optional`` unwrapped, OpenAPI 3.0 spellings (boolean ``exclusiveMinimum``), free-form maps marked
``x-kubernetes-preserve-unknown-fields``, defaults for nested objects, and each model's CEL rules as
``x-kubernetes-validations``.

``crds/`` also gets kopf's peering CRDs (kopf.dev/v1 ClusterKopfPeering and KopfPeering): several operator
replicas agree through them that only one acts. Each replica writes a heartbeat into a peering object; the one
with the highest priority works, the others stand by (``branchmerge operator --peering NAME``; cluster-wide
mode uses a ClusterKopfPeering, namespaced mode a KopfPeering in every served namespace).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .base import ApiModel
from .common import GROUP, PHASES, VERSION, Status
from .resources import KIND_INFO

CATEGORY = "branchmerge"


def _models_by_name(root: type[BaseModel]) -> dict[str, type[ApiModel]]:
    """Every ApiModel class reachable from ``root``, by class name (pydantic's $defs keys)."""
    found: dict[str, type[ApiModel]] = {}
    stack: list[Any] = [root]
    while stack:
        tp = stack.pop()
        if isinstance(tp, type) and issubclass(tp, ApiModel):
            if tp.__name__ in found:
                continue
            found[tp.__name__] = tp
            stack += [f.annotation for f in tp.model_fields.values()]
        for arg in getattr(tp, "__args__", ()) or ():
            stack.append(arg)
        for meta in getattr(tp, "__metadata__", ()) or ():
            stack.append(meta)
        if hasattr(tp, "__origin__"):
            stack.append(tp.__origin__)
    return found


def _factory_defaults(model: type[ApiModel]) -> dict[str, Any]:
    """Defaults that pydantic leaves out of the schema because they come from a default_factory."""
    out = {}
    for name, field in model.model_fields.items():
        if field.default_factory is not None:
            value = field.default_factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                value = {}  # the API server then applies the nested defaults
            out[field.alias or name] = value
    return out


class _Converter:
    def __init__(self, root: type[BaseModel]):
        self.schema = root.model_json_schema(by_alias=True)
        self.defs = self.schema.pop("$defs", {})
        self.models = _models_by_name(root)

    def convert(self, node: dict, model_name: str | None = None) -> dict:
        node = copy.deepcopy(node)
        if "$ref" in node:  # a field pointing at a model; the field's own keys (description) win
            ref_name = node.pop("$ref").split("/")[-1]
            target = self.convert(self.defs[ref_name], ref_name)
            target.update({k: v for k, v in node.items() if k != "title"})
            return target
        if "anyOf" in node:  # Optional[X] -> X; absence, not null, means "unset"
            branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
            if len(branches) != 1:
                raise ValueError(f"unions other than Optional are not structural: {branches}")
            inner = self.convert(branches[0])
            if node.get("default", "absent") is None:
                node.pop("default")
            inner.update({k: v for k, v in node.items() if k != "title"})
            return inner
        node.pop("title", None)
        if "const" in node:
            node["enum"] = [node.pop("const")]
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
                node[plain] = node.pop(bound)
                node[bound] = True
        kind = node.get("type")
        if kind == "object" or "properties" in node:
            node["type"] = "object"
            props = node.get("properties")
            extra = node.pop("additionalProperties", None)
            extra, key_rule = _map_keys(node, extra)
            if key_rule:  # OpenAPI's propertyNames/patternProperties are not structural: keys are checked by CEL
                node.setdefault("x-kubernetes-validations", []).append(key_rule)
            if props is not None:
                node["properties"] = {k: self.convert(v) for k, v in props.items()}
            elif isinstance(extra, dict) and extra:
                node["additionalProperties"] = self.convert(extra)
            else:  # dict[str, Any]
                node["x-kubernetes-preserve-unknown-fields"] = True
            if model_name and model_name in self.models:
                model = self.models[model_name]
                for key, value in _factory_defaults(model).items():
                    node["properties"][key].setdefault("default", value)
                if model.rules:
                    node.setdefault("x-kubernetes-validations", []).extend(_rule(r) for r in model.rules)
        elif kind == "array":
            node["items"] = self.convert(node.get("items", {}))
        elif kind is None and "enum" not in node:
            node["x-kubernetes-preserve-unknown-fields"] = True
        return node


def _map_keys(node: dict, values: Any) -> tuple[Any, dict | None]:
    """Move a map's key constraints (pydantic's propertyNames, patternProperties) out of ``node``:
    (the values' schema, one CEL rule checking every key, or None)."""
    keys = dict(node.pop("propertyNames", {}))
    patterns = node.pop("patternProperties", None)
    if patterns:
        (pattern, values), = patterns.items()
        keys["pattern"] = pattern
    checks, what = [], []
    if "maxLength" in keys:
        checks.append(f"size(k) <= {keys['maxLength']}")
        what.append(f"be at most {keys['maxLength']} characters long")
    if "pattern" in keys:
        checks.append(f"k.matches({json.dumps(keys['pattern'])})")
        what.append(f"match {keys['pattern']}")
    if not checks:
        return values, None
    return values, {"rule": f"self.all(k, {' && '.join(checks)})", "message": f"every key must {' and '.join(what)}",
                    "reason": "FieldValueInvalid"}


def _rule(rule) -> dict:
    out = {"rule": rule.rule, "message": rule.message}
    if rule.field:
        out["fieldPath"] = rule.field
    out["reason"] = rule.reason
    return out


def openapi_schema(model: type[BaseModel]) -> dict:
    conv = _Converter(model)
    return conv.convert(conv.schema, model.__name__)


def crd_skeleton(group: str, scope: str, names: dict, version: str, schema: dict, **version_fields) -> dict:
    """A CustomResourceDefinition with one served and stored version: the frame ours and kopf's share."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{names['plural']}.{group}", "labels": {"app.kubernetes.io/part-of": "branchmerge"}},
        "spec": {
            "group": group,
            "scope": scope,
            "names": names,
            "versions": [{"name": version, "served": True, "storage": True,
                          "schema": {"openAPIV3Schema": schema}, **version_fields}],
        },
    }


def crd(kind: str) -> dict:
    info = KIND_INFO[kind]
    spec_model = info.model.model_fields["spec"].annotation
    spec_schema = openapi_schema(spec_model)
    status_schema = openapi_schema(Status)
    status_schema["properties"]["phase"]["enum"] = list(PHASES)
    schema = {
        "type": "object",
        "description": (info.model.__doc__ or kind).strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    col_name, col_type, col_path = info.column
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": col_name, "type": col_type, "jsonPath": col_path},
        {"name": "Progress", "type": "number", "format": "float", "jsonPath": ".status.progress.fraction"},
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Reason", "type": "string", "priority": 1,
         "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    names = {"kind": kind, "listKind": f"{kind}List", "plural": info.plural, "singular": kind.lower(),
             "shortNames": list(info.short_names), "categories": [CATEGORY]}
    return crd_skeleton(GROUP, "Namespaced", names, VERSION, schema, subresources={"status": {}},
                        additionalPrinterColumns=columns)


# kopf's peering kinds (leader election of operator replicas), by scope
PEERING_SCOPES = {"ClusterKopfPeering": "Cluster", "KopfPeering": "Namespaced"}


def peering_crd(kind: str) -> dict:
    """kopf's peering CRD: its status is free-form (kopf owns it)."""
    names = {"kind": kind, "plural": kind.lower() + "s", "singular": kind.lower()}
    status = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return crd_skeleton("kopf.dev", PEERING_SCOPES[kind], names, "v1",
                        {"type": "object", "properties": {"status": status}})


def render(kind: str) -> str:
    """The CRD file of one of our kinds or of a kopf peering kind."""
    if kind in PEERING_SCOPES:
        header, doc = "# kopf's peering CRD (leader election of branchmerge operator replicas); do not edit.\n", \
            peering_crd(kind)
    else:
        header, doc = "# Generated by `branchmerge crds` from branchmerge.api; do not edit.\n", crd(kind)
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


def write_all(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    files = {kind: f"{GROUP}_{info.plural}.yaml" for kind, info in KIND_INFO.items()}
    files.update({kind: f"kopf.dev_{kind.lower()}s.yaml" for kind in PEERING_SCOPES})
    for kind, name in files.items():
        path = out / name
        path.write_text(render(kind))
        written.append(path)
    return written
