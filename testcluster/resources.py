"""What the server knows about each resource: a ``ResourceType`` (group/version/plural/kind, scope,
subresources, discovery data) with its ``Strategy`` (the per-kind part of kube-apiserver's REST
strategies: defaulting, PrepareForCreate/Update, validation, the /status rules, field-selector fields,
graceful deletion, the default garbage-collection policy). ``crd_type`` builds one from a
CustomResourceDefinition document; ``testcluster.builtins`` defines the built-in kinds.

Not emulated: multiple served versions of a CRD with conversion (the storage version is served alone),
scale subresources, printer columns (Table output), CRD ``selectableFields`` beyond equality selectors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from . import meta as metav
from .schema import FieldError, Schema
from .store import jcopy

VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


class Strategy:
    """Defaults for a kind with no special rules; built-ins override what they need."""

    generation = False            # metadata.generation tracked and bumped on spec changes
    status_subresource = False    # main-resource writes keep the old status; /status writes only status
    unconditional_update = True   # PUT without metadata.resourceVersion allowed
    default_gc = "Background"     # propagation when a DELETE gives none (batch/v1 Jobs: Orphan)
    return_deleted = False        # an immediate DELETE answers the object (pods) instead of a Status
    schema: Schema | None = None

    def name_errors(self, name: str) -> list[str]:
        return metav.subdomain_errors(name)

    def prune(self, obj: dict) -> list[str]:
        return []

    def default(self, obj: dict) -> None:
        pass

    def decode(self, stored: dict) -> dict:
        """The object as read back from storage (CRDs: pruned and defaulted again)."""
        return stored

    def prepare_create(self, obj: dict, ctx: Any) -> None:
        if self.status_subresource:
            obj.pop("status", None)

    def prepare_update(self, new: dict, old: dict) -> None:
        if self.status_subresource:
            if "status" in old:
                new["status"] = jcopy(old["status"])
            else:
                new.pop("status", None)

    def prepare_status_update(self, new: dict, old: dict) -> dict:
        """The /status rule: everything but ``status`` comes from the old object."""
        out = jcopy(old)
        if "status" in new:
            out["status"] = new["status"]
        else:
            out.pop("status", None)
        return out

    def validate(self, obj: dict) -> list[FieldError]:
        return []

    def validate_update(self, new: dict, old: dict) -> list[FieldError]:
        return self.validate(new)

    def validate_status_update(self, new: dict, old: dict) -> list[FieldError]:
        return []

    def spec_changed(self, new: dict, old: dict) -> bool:
        """Whether the generation moves: any change outside metadata (status excluded by the caller)."""
        return {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
            k: v for k, v in old.items() if k not in ("metadata", "status")}

    def fields(self, obj: dict) -> dict[str, str]:
        meta = obj.get("metadata") or {}
        out = {"metadata.name": meta.get("name", "")}
        if meta.get("namespace") is not None:
            out["metadata.namespace"] = meta.get("namespace", "")
        return out

    extra_fields: frozenset = frozenset()

    def supports_field(self, name: str) -> bool:
        return name in ("metadata.name", "metadata.namespace") or name in self.extra_fields

    def graceful_seconds(self, obj: dict, requested: int | None) -> int:
        """Seconds of graceful deletion (0: delete now, finalizers permitting)."""
        return 0


@dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    strategy: Strategy
    singular: str = ""
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    subresources: tuple[str, ...] = ()
    is_crd: bool = False
    crd: dict | None = None
    storage_key: str = ""  # resources sharing storage (core/v1 and events.k8s.io/v1 Events) share this
    to_storage: Callable[[dict], dict] | None = None
    from_storage: Callable[[dict], dict] | None = None

    def __post_init__(self) -> None:
        self.singular = self.singular or self.kind.lower()
        self.storage_key = self.storage_key or f"{self.group}/{self.plural}"

    @property
    def gv(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``configmaps`` or ``merges.branchmerge.dev``: how errors name the resource."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def discovery(self) -> list[dict]:
        main = {"name": self.plural, "singularName": self.singular, "namespaced": self.namespaced,
                "kind": self.kind, "verbs": VERBS}
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        out = [main]
        for sub in self.subresources:
            verbs = {"status": ["get", "patch", "update"], "binding": ["create"], "log": ["get"],
                     "finalize": ["update"]}.get(sub, ["get"])
            kind = {"binding": "Binding", "log": "Pod"}.get(sub, self.kind)
            out.append({"name": f"{self.plural}/{sub}", "singularName": "", "namespaced": self.namespaced,
                        "kind": kind, "verbs": verbs})
        return out


class CustomResourceStrategy(Strategy):
    """customResourceStrategy: generation on every non-metadata change, status via /status when declared,
    structural pruning/defaulting/validation, no unconditional updates."""

    generation = True
    unconditional_update = False

    def __init__(self, schema: Schema, status: bool, selectable: list[str]):
        self.schema = schema
        self.status_subresource = status
        self.extra_fields = frozenset(selectable)

    def prune(self, obj: dict) -> list[str]:
        return self.schema.prune(obj)

    def default(self, obj: dict) -> None:
        self.schema.default(obj)

    def decode(self, stored: dict) -> dict:
        view = jcopy(stored)
        self.schema.prune(view)
        self.schema.default(view)
        return view

    def validate(self, obj: dict) -> list[FieldError]:
        return self.schema.validate(obj)

    def validate_update(self, new: dict, old: dict) -> list[FieldError]:
        return self.schema.validate(new, old)

    def validate_status_update(self, new: dict, old: dict) -> list[FieldError]:
        return self.schema.validate(new, old)

    def fields(self, obj: dict) -> dict[str, str]:
        out = super().fields(obj)
        for path in self.extra_fields:
            value: Any = obj
            for part in path.lstrip(".").split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                out[path] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


def crd_type(doc: dict) -> ResourceType:
    """The served storage version of a CRD as a ResourceType (its schema compiled)."""
    spec = doc["spec"]
    names = spec["names"]
    versions = spec.get("versions") or []
    version = next((v for v in versions if v.get("storage")), versions[0])
    schema = Schema((version.get("schema") or {}).get("openAPIV3Schema") or {})
    subs = version.get("subresources") or spec.get("subresources") or {}
    selectable = [s["jsonPath"].lstrip(".") for s in version.get("selectableFields") or []]
    strategy = CustomResourceStrategy(schema, "status" in subs, selectable)
    return ResourceType(spec["group"], version["name"], names["plural"], names["kind"],
                        spec.get("scope", "Namespaced") == "Namespaced", strategy,
                        singular=names.get("singular", ""), short_names=names.get("shortNames") or [],
                        categories=names.get("categories") or [], subresources=("status",) if "status" in subs else (),
                        is_crd=True, crd=doc)
