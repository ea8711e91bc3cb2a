"""The API server stand-in: Kubernetes HTTP/JSON on 127.0.0.1 (and on further addresses given to ``listen``:
a node's pod-network gateway), from scratch on aiohttp.web, loaded with the committed CRDs. What kopf
1.45, the operator's client, the Job controller and the kubelet stand-ins rely on:

- discovery (``/api``, ``/apis``, ``/api/v1``, ``/apis/<group>[/<version>]``, ``/version``, ``/healthz``);
- the request pipeline, in kube-apiserver's order: decode (JSON only; malformed JSON and NaN/Infinity are 400)
  → prune unknown fields (CRDs; ``fieldValidation=Strict`` turns them into a 400, otherwise a ``Warning``
  header) → default (CRD structural defaults; built-in defaulting) → admission (NamespaceLifecycle: 404 for a
  missing namespace, 403 for a terminating one) → PrepareForCreate/Update (status rules, server-owned
  metadata: uid, creationTimestamp, generation, resourceVersion) → validate (ObjectMeta, the kind's rules,
  OpenAPI schema + CEL for CRDs; 422 Invalid with field causes) → store;
- reads decode through the current schema (defaults appear on get/list/watch of objects stored before the
  CRD gained them, without a write or a generation bump);
- generateName (5 random characters, retried on collision), resourceVersion preconditions (stale PUT or
  patch → 409; a CR PUT without one → 422), no-op writes (no new resourceVersion, no event),
  ``/status`` subresources, merge / JSON (RFC 6902, failed ``test`` → 422) / strategic (as merge) patches;
- list with label/field selectors and ``limit``/``continue`` pages from a consistent snapshot; watch with
  history replay from a resourceVersion, synthetic ADDED for "" / "0", ``sendInitialEvents``, bookmarks,
  ``timeoutSeconds``, selector enter/leave as ADDED/DELETED, 410 Expired after ``compact()``;
- DELETE with preconditions, finalizers, propagationPolicy Background/Foreground/Orphan (the orphan and
  foregroundDeletion finalizers; batch/v1 Jobs orphan by default), graceful pod deletion, namespace
  Terminating; garbage collection runs asynchronously in ``testcluster.gc``; delete-collection;
- pods/binding, pods/log (files registered by the kubelet stand-in at
  ``PUT /testcluster/v1/namespaces/<ns>/pods/<pod>/logs/<container>`` with ``{"path": ...}``);
- fault injection (``server.faults``) and an audit set of (user agent, verb, group, resource[/sub]).

Not emulated: authentication/authorization (RBAC is only audited), admission webhooks and other admission
plugins (LimitRanger, ResourceQuota, ServiceAccount token mounting...), server-side apply and managedFields,
protobuf/CBOR/YAML bodies, Table output, API priority and fairness, ``resourceVersionMatch`` on lists and
lists at an older resourceVersion, dry-run beyond skipping the write, the ``scale``/``eviction``/``exec``/
``attach``/``portforward`` subresources, multiple CRD versions and conversion webhooks, watch-cache slow
consumer termination, aggregated discovery (``application/json;g=apidiscovery.k8s.io``).
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import aiohttp.web
import yaml

from . import meta as metav
from .builtins import builtin_types, now
from .faults import Faults
from .resources import ResourceType, crd_type
from .schema import FieldError
from .selectors import SelectorError, parse_fields, parse_labels
from .store import Event, Storage, Stored, Watcher, dumps, jcopy

log = logging.getLogger("testcluster.apiserver")

REPO = Path(__file__).resolve().parent.parent
JSON = "application/json"
PATCH_TYPES = {"application/merge-patch+json": "merge", "application/json-patch+json": "json",
               "application/strategic-merge-patch+json": "strategic", "application/apply-patch+yaml": "apply"}
GENERATE_NAME_ATTEMPTS = 8


class StatusError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}
        self.headers = headers or {}

    def body(self) -> dict:
        out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
               "reason": self.reason, "code": self.code}
        if self.details:
            out["details"] = self.details
        return out


def _details(rt: ResourceType, name: str | None, **extra) -> dict:
    out = {"name": name or "", "group": rt.group, "kind": rt.plural}
    out.update(extra)
    return {k: v for k, v in out.items() if v != "" or k == "name"}


def not_found(rt: ResourceType, name: str) -> StatusError:
    return StatusError(404, "NotFound", f'{rt.qualified} "{name}" not found', _details(rt, name))


def conflict(rt: ResourceType, name: str) -> StatusError:
    return StatusError(409, "Conflict", f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has '
                       "been modified; please apply your changes to the latest version and try again",
                       _details(rt, name))


def bad_request(message: str) -> StatusError:
    return StatusError(400, "BadRequest", message)


def invalid(rt: ResourceType, name: str, errors: list[FieldError]) -> StatusError:
    text = "; ".join(str(e) for e in errors) if False else ", ".join(str(e) for e in errors)
    message = f'{rt.qualified_kind()} "{name}" is invalid: ' + (text if len(errors) == 1 else f"[{text}]")
    details = {"name": name, "group": rt.group, "kind": rt.kind, "causes": [e.cause() for e in errors]}
    return StatusError(422, "Invalid", message, {k: v for k, v in details.items() if v != ""})


def _reject_constant(token: str):
    raise ValueError(f"invalid JSON number {token}")


def decode_json(body: bytes) -> Any:
    """JSON only; NaN/Infinity (which Python's json accepts) are not JSON."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"error decoding JSON body: {err}") from None


def _parse_time(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _stamp(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- patches -----------------------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return jcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class PatchError(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, dict):
            if part not in doc:
                raise PatchError(f"missing path: /{'/'.join(parts)}")
            doc = doc[part]
        elif isinstance(doc, list):
            try:
                doc = doc[int(part)]
            except (ValueError, IndexError):
                raise PatchError(f"missing path: /{'/'.join(parts)}") from None
        else:
            raise PatchError(f"missing path: /{'/'.join(parts)}")
    return doc


def _add(doc: Any, parts: list[str], value: Any, replace: bool = False) -> Any:
    if not parts:
        return value
    parent = _resolve(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise PatchError(f"replace operation does not apply: doc is missing key: /{'/'.join(parts)}")
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-" and not replace:
            parent.append(value)
        else:
            try:
                index = int(last)
            except ValueError:
                raise PatchError(f"invalid array index {last!r}") from None
            if replace:
                if not 0 <= index < len(parent):
                    raise PatchError(f"replace operation does not apply: doc is missing path: /{'/'.join(parts)}")
                parent[index] = value
            else:
                if not 0 <= index <= len(parent):
                    raise PatchError(f"add operation does not apply: index out of range: /{'/'.join(parts)}")
                parent.insert(index, value)
    else:
        raise PatchError(f"doc is missing path: /{'/'.join(parts)}")
    return doc


def _remove(doc: Any, parts: list[str]) -> tuple[Any, Any]:
    if not parts:
        raise PatchError("cannot remove the whole document")
    parent = _resolve(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"remove operation does not apply: doc is missing path: /{'/'.join(parts)}")
        return doc, parent.pop(last)
    if isinstance(parent, list):
        try:
            return doc, parent.pop(int(last))
        except (ValueError, IndexError):
            raise PatchError(f"remove operation does not apply: doc is missing path: /{'/'.join(parts)}") from None
    raise PatchError(f"doc is missing path: /{'/'.join(parts)}")


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 on a copy."""
    if not isinstance(ops, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc = jcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid operation {op!r}")
        kind, parts = op["op"], _pointer(op["path"])
        if kind == "add":
            doc = _add(doc, parts, jcopy(op.get("value")))
        elif kind == "replace":
            doc = _add(doc, parts, jcopy(op.get("value")), replace=True)
        elif kind == "remove":
            doc, _ = _remove(doc, parts)
        elif kind == "move":
            doc, value = _remove(doc, _pointer(op.get("from", "")))
            doc = _add(doc, parts, value)
        elif kind == "copy":
            doc = _add(doc, parts, jcopy(_resolve(doc, _pointer(op.get("from", "")))))
        elif kind == "test":
            if _resolve(doc, parts) != op.get("value"):
                raise PatchError(f"testing value /{'/'.join(parts)} failed: test failed")
        else:
            raise PatchError(f"Unexpected kind: {kind}")
    return doc


# ---- the server core ---------------------------------------------------------------------------------------

class _CreateCtx:
    """What PrepareForCreate hooks may use: the clusterIP allocator and post-commit actions."""

    def __init__(self, core: "Core"):
        self.core = core
        self.after: list[Callable] = []

    def allocate_ip(self) -> str:
        return self.core.allocate_ip()

    def after_commit(self, fn: Callable) -> None:
        self.after.append(fn)


class Core:
    """State and verbs; runs on one event loop (no locks: every mutation is synchronous)."""

    def __init__(self, *, crds_dir: Path | None, history: int, bookmark_interval: float, seed: int | None):
        self.rv = 1
        self.history = history
        self.bookmark_interval = bookmark_interval
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.by_kind: dict[tuple[str, str], ResourceType] = {}
        self.storages: dict[str, Storage] = {}
        self.schema_gen: dict[str, int] = {}
        self.rng = random.Random(seed)
        self.audit: set[tuple[str, str, str, str]] = set()
        self.logs: dict[tuple[str, str, str], str] = {}
        self.previous_logs: dict[tuple[str, str, str], str] = {}
        self.continues: dict[str, tuple[float, int, list[str], str, str]] = {}
        self.watch_tasks: set[asyncio.Task] = set()
        self.gc_notify: Callable[[], None] = lambda: None
        self._ip = 10
        for rt in builtin_types():
            self.register(rt)
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(self.type_for("", "v1", "namespaces"), None, {"metadata": {"name": ns}})
        if crds_dir is not None:
            for path in sorted(Path(crds_dir).glob("*.yaml")):
                for doc in yaml.safe_load_all(path.read_text()):
                    if doc and doc.get("kind") == "CustomResourceDefinition":
                        self.install_crd(doc)

    # ---- types ----------------------------------------------------------------------------------------

    def register(self, rt: ResourceType) -> None:
        self.types[(rt.group, rt.version, rt.plural)] = rt
        self.by_kind[(rt.gv, rt.kind)] = rt
        self.storages.setdefault(rt.storage_key, Storage(self.history))
        self.schema_gen[rt.storage_key] = self.schema_gen.get(rt.storage_key, 0) + 1

    def type_for(self, group: str, version: str, plural: str) -> ResourceType:
        return self.types[(group, version, plural)]

    def install_crd(self, doc: dict) -> ResourceType:
        """Serve (or re-serve, with a new schema) a CRD; its stored objects are kept and decoded anew."""
        rt = crd_type(doc)
        old = self.types.get((rt.group, rt.version, rt.plural))
        self.register(rt)
        crds = self.type_for("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        body = jcopy(doc)
        body.setdefault("status", {})
        name = doc["metadata"]["name"]
        stored = self.storage(crds).objects.get(("", name))
        body["status"] = {"conditions": [{"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                                          "lastTransitionTime": now()}],
                          "acceptedNames": doc["spec"]["names"], "storedVersions": [rt.version]}
        if stored is None:
            meta = body["metadata"]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now())
            meta.setdefault("generation", 1)
            meta.pop("resourceVersion", None)
            self._commit_new(crds, "", body)
        else:
            body["metadata"] = {**stored.raw["metadata"], **{k: v for k, v in doc["metadata"].items()
                                                             if k in ("labels", "annotations")}}
            self._commit_update(crds, stored, body)
        if old is not None and old.kind != rt.kind:
            self.by_kind.pop((old.gv, old.kind), None)
        return rt

    def storage(self, rt: ResourceType) -> Storage:
        return self.storages[rt.storage_key]

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def allocate_ip(self) -> str:
        self._ip += 1
        n = self._ip
        return f"10.96.{n // 254 % 254}.{n % 254 + 1}"

    # ---- reads ----------------------------------------------------------------------------------------

    def view(self, rt: ResourceType, stored: Stored) -> dict:
        return stored.view(rt.strategy.decode, self.schema_gen[rt.storage_key])

    def present(self, rt: ResourceType, obj: dict) -> dict:
        """The object in ``rt``'s API shape (storage shared by two groups converts)."""
        return rt.from_storage(obj) if rt.from_storage else obj

    def present_json(self, rt: ResourceType, stored: Stored) -> str:
        if rt.from_storage:
            return dumps(self.present(rt, self.view(rt, stored)))
        return stored.json(rt.strategy.decode, self.schema_gen[rt.storage_key])

    def get(self, rt: ResourceType, ns: str | None, name: str) -> Stored:
        stored = self.storage(rt).objects.get((ns or "", name))
        if stored is None:
            raise not_found(rt, name)
        return stored

    def selection(self, rt: ResourceType, ns: str | None, label_selector: str | None,
                  field_selector: str | None) -> Callable[[dict], bool]:
        try:
            labels = parse_labels(label_selector)
            fields = parse_fields(field_selector, rt.strategy.supports_field)
        except SelectorError as err:
            raise bad_request(str(err)) from None
        probe = Watcher(ns, labels, fields, rt.strategy.fields, queue=None)  # type: ignore[arg-type]
        return probe.passes

    def list_items(self, rt: ResourceType, ns: str | None, passes: Callable[[dict], bool]) -> list[Stored]:
        objects = self.storage(rt).objects
        keys = sorted(k for k in objects if ns is None or k[0] == ns)
        return [objects[k] for k in keys if passes(self.view(rt, objects[k]))]

    def list_json(self, rt: ResourceType, ns: str | None, params: dict) -> str:
        passes = self.selection(rt, ns, params.get("labelSelector"), params.get("fieldSelector"))
        limit = int(params.get("limit") or 0)
        token = params.get("continue")
        if token:
            entry = self.continues.pop(token, None)
            if entry is None:
                raise StatusError(410, "Expired", "The provided continue parameter is too old to display a "
                                  "consistent list result. You can start a new list without the continue parameter.")
            _, rv, rest, _, _ = entry
            items_json = rest
        else:
            rv = self.rv
            stored = self.list_items(rt, ns, passes)
            items_json = [self._item_json(rt, s) for s in stored]
        meta: dict = {"resourceVersion": str(rv)}
        if limit and len(items_json) > limit:
            page, rest = items_json[:limit], items_json[limit:]
            new_token = base64.urlsafe_b64encode(json.dumps({"rv": rv, "id": uuid.uuid4().hex}).encode()).decode()
            self.continues[new_token] = (time.monotonic(), rv, rest, rt.storage_key, ns or "")
            meta["continue"] = new_token
            meta["remainingItemCount"] = len(rest)
        else:
            page = items_json
        self._expire_continues()
        head = {"kind": f"{rt.kind}List", "apiVersion": rt.gv, "metadata": meta}
        return dumps(head)[:-1] + ',"items":[' + ",".join(page) + "]}"

    def _item_json(self, rt: ResourceType, stored: Stored) -> str:
        if rt.is_crd:
            return self.present_json(rt, stored)
        # Typed lists of built-in kinds carry no kind/apiVersion on their items.
        obj = self.present(rt, self.view(rt, stored))
        return dumps({k: v for k, v in obj.items() if k not in ("kind", "apiVersion")})

    def _expire_continues(self) -> None:
        if len(self.continues) > 64:
            cutoff = time.monotonic() - 300
            for token in [t for t, e in self.continues.items() if e[0] < cutoff]:
                del self.continues[token]

    def objects(self, rt: ResourceType, ns: str | None = None) -> list[dict]:
        return [jcopy(self.present(rt, self.view(rt, s))) for s in self.list_items(rt, ns, lambda o: True)]

    # ---- writes: create ---------------------------------------------------------------------------------

    def _check_body(self, rt: ResourceType, body: Any, ns: str | None) -> dict:
        if not isinstance(body, dict):
            raise bad_request("the body of the request was in an unknown format - accepted media types include: "
                              "application/json")
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if rt.is_crd and (not api_version or not kind):
            raise bad_request("Object 'Kind' is missing in '" + dumps(body)[:200] + "'" if not kind else
                              "Object 'apiVersion' is missing")
        if api_version and api_version != rt.gv:
            raise bad_request(f"the API version in the data ({api_version}) does not match the expected API version "
                              f"({rt.gv})")
        if kind and kind != rt.kind:
            raise bad_request(f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})")
        body = {"apiVersion": rt.gv, "kind": rt.kind, **{k: v for k, v in body.items()
                                                         if k not in ("apiVersion", "kind")}}
        meta = body.get("metadata")
        if meta is None:
            meta = body["metadata"] = {}
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != ns:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the "
                                  "request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if rt.to_storage:
            body = rt.to_storage(body)
        return body

    def _admit_namespace(self, ns: str | None) -> None:
        if ns is None:
            return
        ns_rt = self.type_for("", "v1", "namespaces")
        stored = self.storage(ns_rt).objects.get(("", ns))
        if stored is None:
            raise StatusError(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})
        if (stored.raw.get("status") or {}).get("phase") == "Terminating":
            raise StatusError(403, "Forbidden", f"unable to create new content in namespace {ns} because it is being "
                              "terminated", {"name": ns, "kind": "namespaces",
                                             "causes": [{"reason": "NamespaceTerminating",
                                                         "message": f"namespace {ns} is being terminated",
                                                         "field": "metadata.namespace"}]})

    def create(self, rt: ResourceType, ns: str | None, body: Any, params: dict | None = None,
               warnings: list[str] | None = None) -> dict:
        params = params or {}
        obj = self._check_body(rt, body, ns)
        pruned = rt.strategy.prune(obj)
        self._field_validation(params, pruned, warnings)
        rt.strategy.default(obj)
        self._admit_namespace(ns if rt.namespaced else None)
        meta = obj["metadata"]
        if meta.get("resourceVersion"):
            raise StatusError(500, "InternalError", "resourceVersion should not be set on objects to be created")
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink", "managedFields"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        if rt.strategy.generation:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        generated = bool(meta.get("generateName")) and not meta.get("name")
        store = self.storage(rt)
        for attempt in range(GENERATE_NAME_ATTEMPTS if generated else 1):
            if generated:
                meta["name"] = metav.generate_name(meta["generateName"], self.rng)
            if (ns or "", meta.get("name") or "") not in store.objects:
                break
        candidate = jcopy(obj)
        ctx = _CreateCtx(self)
        rt.strategy.prepare_create(candidate, ctx)
        errors = metav.validate_create(candidate["metadata"], namespaced=rt.namespaced,
                                       name_errors=rt.strategy.name_errors)
        errors += rt.strategy.validate(candidate)
        if errors:
            raise invalid(rt, candidate["metadata"].get("name") or candidate["metadata"].get("generateName", ""),
                          errors)
        name = candidate["metadata"]["name"]
        if (ns or "", name) in store.objects:
            if generated:
                raise StatusError(500, "ServerTimeout", f"The POST operation against {rt.qualified} could not be "
                                  "completed at this time, please try again.", _details(rt, name, retryAfterSeconds=1),
                                  headers={"Retry-After": "1"})
            raise StatusError(409, "AlreadyExists", f'{rt.qualified} "{name}" already exists', _details(rt, name))
        if params.get("dryRun"):
            candidate["metadata"]["resourceVersion"] = str(self.rv)
            return self.present(rt, candidate)
        if self._is_crd_type(rt):
            self.install_crd(candidate)
            return self.present(rt, self.view(rt, store.objects[("", name)]))
        stored = self._commit_new(rt, ns or "", candidate)
        for fn in ctx.after:
            asyncio.get_event_loop().call_soon(fn, self)
        return self.present(rt, self.view(rt, stored))

    def _field_validation(self, params: dict, pruned: list[str], warnings: list[str] | None) -> None:
        mode = params.get("fieldValidation", "Warn")
        if not pruned or mode == "Ignore":
            return
        if mode == "Strict":
            raise bad_request("strict decoding error: " + ", ".join(f'unknown field "{p}"' for p in pruned))
        if warnings is not None:
            warnings.extend(f'unknown field "{p}"' for p in pruned)

    def _commit_new(self, rt: ResourceType, ns: str, obj: dict) -> Stored:
        rv = self.next_rv()
        obj["metadata"]["resourceVersion"] = str(rv)
        stored = self._stored(rt, obj, rv)
        store = self.storage(rt)
        store.objects[(ns, obj["metadata"]["name"])] = stored
        store.record(Event(rv, "ADDED", self.view(rt, stored), None))
        if obj["metadata"].get("ownerReferences"):
            self.gc_notify()
        return stored

    # ---- writes: update / patch -------------------------------------------------------------------------

    def update(self, rt: ResourceType, ns: str | None, name: str, body: Any, sub: str | None,
               params: dict | None = None, warnings: list[str] | None = None) -> dict:
        """PUT."""
        stored = self.get(rt, ns, name)
        obj = self._check_body(rt, body, ns)
        if obj["metadata"].get("name") != name:
            raise bad_request(f"the name of the object ({obj['metadata'].get('name')}) does not match the name on the "
                              f"URL ({name})")
        rv = obj["metadata"].get("resourceVersion")
        if not rv and not rt.strategy.unconditional_update:
            raise invalid(rt, name, [FieldError("metadata.resourceVersion", "FieldValueInvalid",
                                                "Invalid value: 0x0: must be specified for an update")])
        return self._update(rt, stored, obj, sub, params or {}, warnings)

    def patch(self, rt: ResourceType, ns: str | None, name: str, body: Any, patch_type: str, sub: str | None,
              params: dict | None = None, warnings: list[str] | None = None) -> dict:
        stored = self.get(rt, ns, name)
        current = jcopy(self.present(rt, self.view(rt, stored)))
        if patch_type == "json":
            try:
                new = json_patch(current, body)
            except PatchError as err:
                raise StatusError(422, "Invalid", str(err)) from None
        elif patch_type in ("merge", "strategic"):
            if not isinstance(body, dict):
                raise bad_request("json: cannot unmarshal array into Go value of type map[string]interface {}")
            new = merge_patch(current, body)
        else:
            raise StatusError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                              "accepted media types include: application/json-patch+json, "
                              "application/merge-patch+json, application/strategic-merge-patch+json")
        if not isinstance(new, dict):
            raise StatusError(422, "Invalid", "the patched object is not a JSON object")
        obj = self._check_body(rt, new, ns)
        if obj["metadata"].get("name") != name:
            raise invalid(rt, name, [FieldError("metadata.name", "FieldValueInvalid",
                                                f"Invalid value: {json.dumps(obj['metadata'].get('name'))}: field is "
                                                "immutable")])
        return self._update(rt, stored, obj, sub, params or {}, warnings)

    def _update(self, rt: ResourceType, stored: Stored, new: dict, sub: str | None, params: dict,
                warnings: list[str] | None) -> dict:
        old = self.view(rt, stored)
        meta, ometa = new["metadata"], old["metadata"]
        name = ometa["name"]
        if meta.get("resourceVersion") and meta["resourceVersion"] != ometa["resourceVersion"]:
            raise conflict(rt, name)
        pruned = rt.strategy.prune(new)
        self._field_validation(params, pruned, warnings)
        rt.strategy.default(new)
        if sub == "status":
            new = rt.strategy.prepare_status_update(new, old)
            meta = new["metadata"]
        elif sub == "finalize":  # namespaces: only spec.finalizers changes
            fins = (new.get("spec") or {}).get("finalizers") or []
            new = jcopy(old)
            new.setdefault("spec", {})["finalizers"] = fins
            meta = new["metadata"]
        else:
            rt.strategy.prepare_update(new, old)
        # The fields the server owns (rest.BeforeUpdate).
        if not meta.get("uid"):
            meta["uid"] = ometa.get("uid")
        meta["creationTimestamp"] = ometa.get("creationTimestamp")
        if "generation" in ometa:
            meta["generation"] = ometa["generation"]
        else:
            meta.pop("generation", None)
        if ometa.get("deletionTimestamp"):
            meta["deletionTimestamp"] = ometa["deletionTimestamp"]
        if ometa.get("deletionGracePeriodSeconds") is not None and meta.get("deletionGracePeriodSeconds") is None:
            meta["deletionGracePeriodSeconds"] = ometa["deletionGracePeriodSeconds"]
        meta.pop("selfLink", None)
        meta.pop("managedFields", None)
        meta["resourceVersion"] = ometa["resourceVersion"]
        if rt.strategy.generation and sub != "status" and rt.strategy.spec_changed(new, old):
            meta["generation"] = int(ometa.get("generation") or 0) + 1
        errors = metav.validate_update(meta, ometa)
        if sub == "status":
            errors += rt.strategy.validate_status_update(new, old)
        else:
            errors += rt.strategy.validate_update(new, old)
        if errors:
            raise invalid(rt, name, errors)
        if params.get("dryRun"):
            return self.present(rt, new)
        if new == stored.raw:
            return self.present(rt, old)  # a no-op: no new resourceVersion, no event
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not meta.get(
                "deletionGracePeriodSeconds") and not (rt.plural == "namespaces" and (new.get("spec") or {}).get(
                    "finalizers")):
            return self.present(rt, self._commit_delete(rt, stored, new))
        if self._is_crd_type(rt) and sub is None:
            return self.present(rt, self.view(rt, self.storage(rt).objects[("", name)])) if self.install_crd(
                new) else {}
        stored = self._commit_update(rt, stored, new)
        return self.present(rt, self.view(rt, stored))

    @staticmethod
    def _is_crd_type(rt: ResourceType) -> bool:
        return rt.group == "apiextensions.k8s.io" and rt.plural == "customresourcedefinitions"

    def _stored(self, rt: ResourceType, obj: dict, rv: int) -> Stored:
        """A just-written object already went through this schema's pruning and defaulting: it is its own
        view (no decode until the schema changes)."""
        stored = Stored(obj, rv)
        stored._view, stored._gen = obj, self.schema_gen[rt.storage_key]
        return stored

    def _commit_update(self, rt: ResourceType, stored: Stored, new: dict) -> Stored:
        store = self.storage(rt)
        prev = self.view(rt, stored)
        rv = self.next_rv()
        new["metadata"]["resourceVersion"] = str(rv)
        fresh = self._stored(rt, new, rv)
        key = (new["metadata"].get("namespace") or "", new["metadata"]["name"])
        store.objects[key] = fresh
        store.record(Event(rv, "MODIFIED", self.view(rt, fresh), prev))
        pm, nm = prev.get("metadata", {}), new["metadata"]
        if (pm.get("ownerReferences") != nm.get("ownerReferences") or pm.get("finalizers") != nm.get("finalizers")
                or pm.get("deletionTimestamp") != nm.get("deletionTimestamp")
                or (prev.get("status") or {}).get("phase") != (new.get("status") or {}).get("phase")):
            self.gc_notify()
        return fresh

    def _commit_delete(self, rt: ResourceType, stored: Stored, last: dict | None = None) -> dict:
        store = self.storage(rt)
        obj = jcopy(last if last is not None else self.view(rt, stored))
        rv = self.next_rv()
        obj["metadata"]["resourceVersion"] = str(rv)
        key = (obj["metadata"].get("namespace") or "", obj["metadata"]["name"])
        store.objects.pop(key, None)
        store.record(Event(rv, "DELETED", obj, None))
        if rt.plural == "pods" and not rt.group:
            for log_key in [k for k in self.logs if k[:2] == key]:
                self.logs.pop(log_key, None)
                self.previous_logs.pop(log_key, None)
        if rt.plural == "customresourcedefinitions":
            self._uninstall_crd(obj)
        self.gc_notify()
        return obj

    def _uninstall_crd(self, crd: dict) -> None:
        spec = crd.get("spec") or {}
        for version in spec.get("versions") or []:
            rt = self.types.pop((spec.get("group"), version.get("name"), (spec.get("names") or {}).get("plural")),
                                None)
            if rt is not None:
                self.by_kind.pop((rt.gv, rt.kind), None)
                store = self.storages.pop(rt.storage_key, None)
                for watcher in list(store.watchers if store else ()):
                    watcher.close()

    # ---- writes: delete ---------------------------------------------------------------------------------

    def delete(self, rt: ResourceType, ns: str | None, name: str, options: dict) -> tuple[dict, int]:
        """(response body, status code)."""
        stored = self.get(rt, ns, name)
        old = self.view(rt, stored)
        meta = old["metadata"]
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != meta.get("uid"):
            raise StatusError(409, "Conflict", f"Precondition failed: UID in precondition: {pre['uid']}, UID in "
                              f"object meta: {meta.get('uid')}", _details(rt, name))
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta.get("resourceVersion"):
            raise StatusError(409, "Conflict", f"Precondition failed: ResourceVersion in precondition: "
                              f"{pre['resourceVersion']}, ResourceVersion in object meta: {meta.get('resourceVersion')}",
                              _details(rt, name))
        if options.get("dryRun"):
            return self.present(rt, old), 200
        new = jcopy(old)
        nmeta = new["metadata"]
        fins = list(nmeta.get("finalizers") or [])
        fins_changed = self._propagation_finalizers(rt, fins, options)
        if rt.plural == "namespaces" and not rt.group:
            return self._delete_namespace(rt, stored, new, fins, fins_changed)
        grace_requested = options.get("gracePeriodSeconds")
        if grace_requested is not None and grace_requested < 0:
            grace_requested = 1
        changed = fins_changed
        if fins_changed:
            if fins:
                nmeta["finalizers"] = fins
            else:
                nmeta.pop("finalizers", None)
        if meta.get("deletionTimestamp"):
            # Already being deleted: only a shorter grace period (pods) or finalizer changes apply.
            current = meta.get("deletionGracePeriodSeconds") or 0
            if grace_requested is not None and current and grace_requested < current:
                start = _parse_time(meta["deletionTimestamp"]) - current
                nmeta["deletionTimestamp"] = _stamp(start + grace_requested)
                nmeta["deletionGracePeriodSeconds"] = grace_requested
                changed = True
            if not nmeta.get("finalizers") and not nmeta.get("deletionGracePeriodSeconds"):
                return self._deleted_response(rt, self._commit_delete(rt, stored, new))
            if changed:
                stored = self._commit_update(rt, stored, new)
            return self.present(rt, self.view(rt, stored)), 200
        grace = rt.strategy.graceful_seconds(old, grace_requested)
        if grace > 0 or fins:
            nmeta["deletionTimestamp"] = _stamp(time.time() + grace)
            nmeta["deletionGracePeriodSeconds"] = grace
            if grace > 0 and nmeta.get("generation"):
                nmeta["generation"] = int(nmeta["generation"]) + 1
            stored = self._commit_update(rt, stored, new)
            return self.present(rt, self.view(rt, stored)), 200
        return self._deleted_response(rt, self._commit_delete(rt, stored, new))

    def _deleted_response(self, rt: ResourceType, obj: dict) -> tuple[dict, int]:
        if rt.strategy.return_deleted:
            return self.present(rt, obj), 200
        meta = obj["metadata"]
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": _details(rt, meta["name"], uid=meta.get("uid"))}, 200

    def _propagation_finalizers(self, rt: ResourceType, fins: list[str], options: dict) -> bool:
        """Add/remove ``orphan``/``foregroundDeletion`` as the delete options (or the kind's default) say."""
        policy = options.get("propagationPolicy")
        orphan_flag = options.get("orphanDependents")
        if orphan_flag is not None:
            policy = "Orphan" if orphan_flag else "Background"
        if policy is None:
            if "orphan" in fins or "foregroundDeletion" in fins:
                return False
            policy = rt.strategy.default_gc
        before = list(fins)
        if policy == "Orphan":
            if "orphan" not in fins:
                fins.append("orphan")
            if "foregroundDeletion" in fins:
                fins.remove("foregroundDeletion")
        elif policy == "Foreground":
            if "foregroundDeletion" not in fins:
                fins.append("foregroundDeletion")
            if "orphan" in fins:
                fins.remove("orphan")
        elif policy == "Background":
            for f in ("orphan", "foregroundDeletion"):
                if f in fins:
                    fins.remove(f)
        else:
            raise invalid(rt, "", [FieldError("propagationPolicy", "FieldValueNotSupported",
                                              f'Unsupported value: "{policy}": supported values: "Foreground", '
                                              '"Background", "Orphan", "nil"')])
        return fins != before

    def _delete_namespace(self, rt, stored, new, fins, fins_changed) -> tuple[dict, int]:
        nmeta = new["metadata"]
        if fins:
            nmeta["finalizers"] = fins
        else:
            nmeta.pop("finalizers", None)
        if not nmeta.get("deletionTimestamp"):
            nmeta["deletionTimestamp"] = now()
            nmeta["deletionGracePeriodSeconds"] = 0
        new.setdefault("status", {})["phase"] = "Terminating"
        if not (new.get("spec") or {}).get("finalizers") and not fins:
            return self._deleted_response(rt, self._commit_delete(rt, stored, new))
        if new != stored.raw:
            stored = self._commit_update(rt, stored, new)
        return self.present(rt, self.view(rt, stored)), 200

    def delete_collection(self, rt: ResourceType, ns: str | None, params: dict, options: dict) -> dict:
        passes = self.selection(rt, ns, params.get("labelSelector"), params.get("fieldSelector"))
        items = []
        for stored in self.list_items(rt, ns, passes):
            meta = stored.raw["metadata"]
            try:
                body, _ = self.delete(rt, meta.get("namespace"), meta["name"], options)
            except StatusError as err:
                if err.code == 404:
                    continue
                raise
            if body.get("kind") != "Status":
                items.append(body)
        return {"kind": f"{rt.kind}List", "apiVersion": rt.gv, "metadata": {"resourceVersion": str(self.rv)},
                "items": items}

    # ---- pods ---------------------------------------------------------------------------------------------

    def bind(self, ns: str, name: str, body: Any) -> dict:
        rt = self.type_for("", "v1", "pods")
        stored = self.get(rt, ns, name)
        if not isinstance(body, dict) or not (body.get("target") or {}).get("name"):
            raise invalid(rt, name, [FieldError("target.name", "FieldValueRequired", "Required value")])
        target = body["target"]
        if target.get("kind", "Node") not in ("Node", ""):
            raise invalid(rt, name, [FieldError("target.kind", "FieldValueInvalid",
                                                f'Invalid value: "{target.get("kind")}": must be empty or \'Node\'')])
        pod = jcopy(self.view(rt, stored))
        if pod["metadata"].get("deletionTimestamp"):
            raise StatusError(409, "Conflict", f"pod {name} is being deleted, cannot be assigned to a host",
                              _details(rt, name))
        if pod["spec"].get("nodeName"):
            raise StatusError(409, "Conflict", f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"',
                              _details(rt, name))
        pod["spec"]["nodeName"] = target["name"]
        annotations = (body.get("metadata") or {}).get("annotations")
        if annotations:
            pod["metadata"].setdefault("annotations", {}).update(annotations)
        conditions = [c for c in pod.setdefault("status", {}).get("conditions") or [] if c.get("type") != "PodScheduled"]
        conditions.append({"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                           "lastTransitionTime": now()})
        pod["status"]["conditions"] = conditions
        self._commit_update(rt, stored, pod)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    def bind_claim(self, claim: dict) -> None:
        """The PV controller's part for a PVC: bind it to a fresh volume at once."""
        rt = self.type_for("", "v1", "persistentvolumeclaims")
        meta = claim["metadata"]
        stored = self.storage(rt).objects.get((meta.get("namespace") or "", meta["name"]))
        if stored is None or stored.raw["metadata"].get("uid") != meta.get("uid"):
            return
        pvc = jcopy(self.view(rt, stored))
        if (pvc.get("status") or {}).get("phase") == "Bound":
            return
        spec = pvc.setdefault("spec", {})
        spec.setdefault("volumeName", f"pvc-{meta['uid']}")
        storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        pvc["status"] = {"phase": "Bound", "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                         "capacity": {"storage": storage}}
        pvc["metadata"].setdefault("annotations", {})["pv.kubernetes.io/bind-completed"] = "yes"
        self._commit_update(rt, stored, pvc)

    # ---- watch bookkeeping ----------------------------------------------------------------------------------

    def compact(self, keep: int = 0) -> None:
        """Forget history (an etcd compaction): watches from older resourceVersions get 410; open watches
        receive the 410 ERROR and close, so their clients relist."""
        expired = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "too old resource version", "reason": "Expired", "code": 410}
        for store in self.storages.values():
            store.compact(keep, self.rv)
            for watcher in list(store.watchers):
                watcher.close(expired)
        self.continues.clear()

    def drop_watches(self) -> None:
        for store in self.storages.values():
            for watcher in list(store.watchers):
                watcher.close(abort=True)


# ---- HTTP ----------------------------------------------------------------------------------------------------

def _json_response(body: Any, status: int = 200, headers: dict | None = None) -> aiohttp.web.Response:
    text = body if isinstance(body, str) else dumps(body)
    return aiohttp.web.Response(text=text, status=status, content_type=JSON, headers=headers)


def _flag(value: str | None) -> bool:
    return value in ("true", "1", "True")


class Http:
    """Routes requests to the core."""

    def __init__(self, core: Core, faults: Faults, version: dict):
        self.core, self.faults, self.version = core, faults, version

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        rule = self.faults.take(request.method, request.path_qs)
        if rule is not None:
            if rule.status is None:
                await asyncio.sleep(rule.delay)
            else:
                headers = {"Retry-After": str(rule.retry_after or 1)} if rule.status in (429, 503) else None
                return _json_response(self.faults.status_body(rule), rule.status, headers)
        try:
            return await self.route(request)
        except StatusError as err:
            return _json_response(err.body(), err.code, err.headers or None)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as err:  # a bug here must look like a server error, not hang the client
            log.exception("internal error serving %s %s", request.method, request.path_qs)
            return _json_response(StatusError(500, "InternalError", f"Internal error occurred: {err!r}").body(), 500)

    # ---- routing --------------------------------------------------------------------------------------------

    async def route(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if not parts:
            return _json_response({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/version"]})
        if parts[0] in ("healthz", "readyz", "livez"):
            return aiohttp.web.Response(text="ok")
        if parts == ["version"]:
            return _json_response(self.version)
        if parts[0] == "testcluster":
            return await self.extension(request, parts[1:])
        if parts[0] == "api":
            if len(parts) == 1:
                return _json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}]})
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis":
            if len(parts) == 1:
                return _json_response(self.group_list())
            if len(parts) == 2:
                return self.group(parts[1])
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return self.resource_list(group, version)
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3 and not (group == "" and len(rest) == 3
                                                                and rest[2] in ("status", "finalize")):
            ns, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        rt = self.core.types.get((group, version, plural))
        if rt is None:
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        if (ns is not None and not rt.namespaced) or (sub is not None and sub not in rt.subresources):
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        if rt.namespaced and ns is None and (name is not None or request.method == "POST"):
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        self.record_audit(request, rt, name, sub)
        return await self.dispatch(request, rt, ns, name, sub)

    def record_audit(self, request, rt: ResourceType, name: str | None, sub: str | None) -> None:
        method = request.method
        if method == "GET":
            verb = "watch" if _flag(request.query.get("watch")) else "get" if name else "list"
        elif method == "DELETE" and name is None:
            verb = "deletecollection"
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method, method)
        agent = (request.headers.get("User-Agent") or "").split("/")[0]
        self.core.audit.add((agent, verb, rt.group, rt.plural + (f"/{sub}" if sub else "")))

    async def dispatch(self, request, rt, ns, name, sub) -> aiohttp.web.StreamResponse:
        core, method, params = self.core, request.method, dict(request.query)
        warnings: list[str] = []
        if method == "GET":
            if name is None:
                if _flag(params.get("watch")):
                    return await self.watch(request, rt, ns, params)
                return _json_response(core.list_json(rt, ns, params))
            if sub == "log":
                return await self.pod_log(request, ns, name, params)
            return _json_response(core.present_json(rt, core.get(rt, ns, name)))
        if method == "POST":
            body = decode_json(await request.read())
            if name is None:
                obj = core.create(rt, ns, body, params, warnings)
                return _json_response(obj, 201, self._warn(warnings))
            if sub == "binding":
                return _json_response(core.bind(ns, name, body), 201)
            raise StatusError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if method == "PUT" and name is not None:
            body = decode_json(await request.read())
            return _json_response(core.update(rt, ns, name, body, sub, params, warnings), 200, self._warn(warnings))
        if method == "PATCH" and name is not None:
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
            patch_type = PATCH_TYPES.get(ctype)
            if patch_type is None or patch_type == "apply":
                raise StatusError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                                  "accepted media types include: application/json-patch+json, "
                                  "application/merge-patch+json, application/strategic-merge-patch+json")
            body = decode_json(await request.read())
            return _json_response(core.patch(rt, ns, name, body, patch_type, sub, params, warnings), 200,
                                  self._warn(warnings))
        if method == "DELETE":
            raw = await request.read()
            options = decode_json(raw) if raw.strip() else {}
            if not isinstance(options, dict):
                raise bad_request("DeleteOptions must be an object")
            for key, conv in (("propagationPolicy", str), ("gracePeriodSeconds", int), ("orphanDependents", _flag),
                              ("dryRun", str)):
                if key in params and key not in options:
                    options[key] = conv(params[key])
            if name is None:
                return _json_response(core.delete_collection(rt, ns, params, options))
            body, code = core.delete(rt, ns, name, options)
            return _json_response(body, code)
        raise StatusError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    @staticmethod
    def _warn(warnings: list[str]) -> dict | None:
        if not warnings:
            return None
        return {"Warning": ", ".join(f'299 - "{w}"'.replace("\n", " ") for w in warnings)}

    # ---- discovery -----------------------------------------------------------------------------------------

    def _versions(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for (group, version, _plural) in self.core.types:
            if group and version not in groups.setdefault(group, []):
                groups[group].append(version)
        return groups

    def group_list(self) -> dict:
        groups = []
        for group, versions in sorted(self._versions().items()):
            entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
            groups.append({"name": group, "versions": entries, "preferredVersion": entries[0]})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def group(self, group: str) -> aiohttp.web.Response:
        versions = self._versions().get(group)
        if not versions:
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return _json_response({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries,
                               "preferredVersion": entries[0]})

    def resource_list(self, group: str, version: str) -> aiohttp.web.Response:
        resources = []
        for (g, v, _p), rt in sorted(self.core.types.items()):
            if g == group and v == version:
                resources.extend(rt.discovery())
        if not resources:
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        return _json_response({"kind": "APIResourceList", "apiVersion": "v1",
                               "groupVersion": f"{group}/{version}" if group else version, "resources": resources})

    # ---- watch ---------------------------------------------------------------------------------------------

    async def watch(self, request, rt: ResourceType, ns: str | None, params: dict) -> aiohttp.web.StreamResponse:
        core = self.core
        passes = core.selection(rt, ns, params.get("labelSelector"), params.get("fieldSelector"))
        watcher = Watcher(ns, [], [], rt.strategy.fields)
        watcher.passes = passes  # type: ignore[method-assign]
        bookmarks = _flag(params.get("allowWatchBookmarks"))
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else 1800 * (1 + random.random())
        rv_param = params.get("resourceVersion")
        initial = _flag(params.get("sendInitialEvents"))
        store = core.storage(rt)
        backlog: list = []
        if rv_param in (None, "", "0") or initial:
            for stored in core.list_items(rt, ns, passes):
                backlog.append(("ADDED", core.view(rt, stored),
                                lambda s=stored: s.json(rt.strategy.decode, core.schema_gen[rt.storage_key])))
            if initial and bookmarks:
                backlog.append(("BOOKMARK", {"metadata": {"resourceVersion": str(core.rv), "annotations": {
                    "k8s.io/initial-events-end": "true"}}}, None))
        else:
            try:
                since = int(rv_param)
            except ValueError:
                raise bad_request(f"invalid resource version: {rv_param}") from None
            events = store.since(since)
            if events is None:
                backlog.append(("ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                          "message": f"too old resource version: {since} ({store.oldest_valid})",
                                          "reason": "Expired", "code": 410}, None))
                backlog.append(("CLOSE", None, False))
            else:
                for event in events:
                    watcher.offer(event)
        for item in backlog:
            watcher.queue.put_nowait(item)
        store.watchers.add(watcher)
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": JSON,
                                                                   "Cache-Control": "no-cache, private"})
        response.enable_chunked_encoding()
        task = asyncio.current_task()
        if task is not None:
            core.watch_tasks.add(task)
        try:
            await response.prepare(request)
            await self._pump(request, response, rt, watcher, bookmarks, timeout)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            store.watchers.discard(watcher)
            if task is not None:
                core.watch_tasks.discard(task)
        return response

    async def _pump(self, request, response, rt, watcher: Watcher, bookmarks: bool, timeout: float) -> None:
        core = self.core
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_bookmark = loop.time() + core.bookmark_interval
        while True:
            now_t = loop.time()
            if now_t >= deadline:
                if bookmarks:
                    await response.write(self._bookmark(rt).encode())
                await response.write_eof()
                return
            if watcher.queue.empty():
                if bookmarks and now_t >= next_bookmark:
                    await response.write(self._bookmark(rt).encode())
                    next_bookmark = now_t + core.bookmark_interval
                    continue
                wait = deadline - now_t
                if bookmarks:
                    wait = min(wait, next_bookmark - now_t)
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), timeout=max(wait, 0.001))
                except asyncio.TimeoutError:
                    continue
            else:
                item = watcher.queue.get_nowait()
            kind, obj, encoded = item
            if kind == "CLOSE":
                if encoded is True:  # abort: cut the connection without the final chunk
                    if request.transport is not None:
                        request.transport.abort()
                    return
                if obj is not None:
                    await response.write(f'{{"type":"ERROR","object":{dumps(obj)}}}\n'.encode())
                await response.write_eof()
                return
            if rt.from_storage and kind != "ERROR" and kind != "BOOKMARK":
                body = dumps(core.present(rt, obj))
            elif kind == "BOOKMARK":
                body = dumps({"kind": rt.kind, "apiVersion": rt.gv, **obj})
            else:
                body = encoded() if callable(encoded) else dumps(obj)
            await response.write(f'{{"type":"{kind}","object":{body}}}\n'.encode())

    def _bookmark(self, rt: ResourceType) -> str:
        obj = {"kind": rt.kind, "apiVersion": rt.gv, "metadata": {"resourceVersion": str(self.core.rv)}}
        return f'{{"type":"BOOKMARK","object":{dumps(obj)}}}\n'

    # ---- pod logs -------------------------------------------------------------------------------------------

    async def pod_log(self, request, ns: str, name: str, params: dict) -> aiohttp.web.StreamResponse:
        core = self.core
        rt = core.type_for("", "v1", "pods")
        pod = core.view(rt, core.get(rt, ns, name))
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        all_names = containers + [c.get("name") for c in (pod.get("spec") or {}).get("initContainers") or []]
        container = params.get("container")
        if not container:
            if len(containers) != 1:
                raise bad_request(f"a container name must be specified for pod {name}, choose one of: "
                                  f"[{' '.join(containers)}]")
            container = containers[0]
        if container not in all_names:
            raise bad_request(f"container {container} is not valid for pod {name}")
        key = (ns, name, container)
        path = (core.previous_logs if _flag(params.get("previous")) else core.logs).get(key)
        if path is None:
            if _flag(params.get("previous")):
                raise bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
            if (pod.get("status") or {}).get("phase", "Pending") == "Pending":
                raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating')
            return aiohttp.web.Response(text="", content_type="text/plain")
        text = _read_log(path, params)
        if not _flag(params.get("follow")):
            return aiohttp.web.Response(text=text, content_type="text/plain")
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(text.encode())
        offset = os.path.getsize(path) if os.path.exists(path) else 0
        while True:
            await asyncio.sleep(0.2)
            if os.path.exists(path) and os.path.getsize(path) > offset:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                offset += len(chunk)
                await response.write(chunk)
                continue
            stored = core.storage(rt).objects.get((ns, name))
            if stored is None or (stored.raw.get("status") or {}).get("phase") in ("Succeeded", "Failed") or \
                    core.logs.get(key) != path:
                break
        await response.write_eof()
        return response

    async def extension(self, request, parts: list[str]) -> aiohttp.web.Response:
        """``PUT /testcluster/v1/namespaces/<ns>/pods/<pod>/logs/<container>`` {"path": FILE}: the kubelet's
        container log (a re-registration moves the previous file to ``?previous=true``)."""
        if (len(parts) == 7 and parts[0] == "v1" and parts[1] == "namespaces" and parts[3] == "pods"
                and parts[5] == "logs" and request.method == "PUT"):
            body = decode_json(await request.read())
            key = (parts[2], parts[4], parts[6])
            if key in self.core.logs and self.core.logs[key] != body.get("path"):
                self.core.previous_logs[key] = self.core.logs[key]
            self.core.logs[key] = str(body.get("path"))
            return _json_response({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200})
        raise StatusError(404, "NotFound", "the server could not find the requested resource")


def _read_log(path: str, params: dict) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    text = data.decode(errors="replace")
    if params.get("tailLines"):
        lines = text.splitlines(keepends=True)
        text = "".join(lines[-int(params["tailLines"]):]) if int(params["tailLines"]) > 0 else ""
    if params.get("limitBytes"):
        text = text.encode()[: int(params["limitBytes"])].decode(errors="ignore")
    return text


# ---- the public handle ---------------------------------------------------------------------------------------

class ApiServer:
    """The API server in its own thread and event loop (``with ApiServer() as server: server.url``), or in the
    caller's loop (``await server.start_async()`` / ``await server.stop_async()``).

    ``gc``: "background" (kube-controller-manager's garbage collector and namespace controller, running
    ``gc_delay`` seconds after a relevant change and every ``gc_interval`` seconds) or "off" (envtest-like:
    nothing is collected, foreground/orphan deletions stay pending). ``history``: watch events kept per
    resource. ``bookmark_interval``: seconds between watch bookmarks."""

    def __init__(self, crds_dir: Path | str | None = REPO / "crds", *, gc: str = "background", gc_delay: float = 0.2,
                 gc_interval: float = 1.0, bookmark_interval: float = 5.0, history: int = 10000,
                 host: str = "127.0.0.1", port: int = 0, seed: int | None = None):
        if gc not in ("background", "off"):
            raise ValueError(f"gc must be 'background' or 'off', not {gc!r}")
        self.crds_dir = Path(crds_dir) if crds_dir is not None else None
        self.gc_mode, self.gc_delay, self.gc_interval = gc, gc_delay, gc_interval
        self.bookmark_interval, self.history_size = bookmark_interval, history
        self.host, self.port, self.seed = host, port, seed
        self.faults = Faults()
        self.core: Core | None = None
        self.gc = None
        self.url = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self._runner: aiohttp.web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def start_async(self) -> "ApiServer":
        from .gc import GarbageCollector

        self.loop = asyncio.get_running_loop()
        self.core = Core(crds_dir=self.crds_dir, history=self.history_size,
                         bookmark_interval=self.bookmark_interval, seed=self.seed)
        self.faults._drop = lambda: self._call_soon(self.core.drop_watches)
        http = Http(self.core, self.faults, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-testcluster",
                                             "platform": "linux/amd64"})
        app = aiohttp.web.Application(client_max_size=3 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", http.handle)
        self._runner = aiohttp.web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.host}:{port}"
        if self.gc_mode == "background":
            self.gc = GarbageCollector(self.core, delay=self.gc_delay, interval=self.gc_interval)
            self.core.gc_notify = self.gc.notify
            self.gc.start()
        return self

    async def stop_async(self) -> None:
        if self.gc is not None:
            await self.gc.stop()
        if self.core is not None:
            self.core.drop_watches()
            for task in list(self.core.watch_tasks):
                task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def listen_async(self, host: str) -> str:
        """Also serve on ``host``, at the same port: e.g. a node's pod-network gateway, so that pods in their
        own network namespaces reach the server (the ``kubernetes`` Service). Returns that URL."""
        port = int(self.url.rsplit(":", 1)[1])
        site = aiohttp.web.TCPSite(self._runner, host, port)
        await site.start()  # the runner's cleanup in stop_async closes every site
        return f"http://{host}:{port}"

    def listen(self, host: str) -> str:
        """``listen_async`` from another thread (the server running in its own)."""
        assert self.loop is not None, "the server is not running"
        return asyncio.run_coroutine_threadsafe(self.listen_async(host), self.loop).result(30)

    def start(self) -> "ApiServer":
        self._thread = threading.Thread(target=self._run, name="testcluster-apiserver", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the API server did not start: {self._error!r}")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def main():
            self._stop_event = asyncio.Event()
            try:
                await self.start_async()
            except BaseException as err:
                self._error = err
                self._ready.set()
                raise
            self._ready.set()
            await self._stop_event.wait()
            await self.stop_async()

        try:
            loop.run_until_complete(main())
        except BaseException:
            log.exception("the API server thread failed")
        finally:
            loop.close()

    def stop(self) -> None:
        if self._thread is not None and self.loop is not None and self._stop_event is not None:
            self.loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(15)
            self._thread = None

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- in-process handles (thread-safe) ---------------------------------------------------------------------

    def _call(self, fn: Callable, *args):
        """Run ``fn`` on the server's loop and return its result (directly when already on it)."""
        assert self.loop is not None and self.core is not None, "the server is not running"
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return fn(*args)

        async def call():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(30)

    def _call_soon(self, fn: Callable) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn)

    def _rt(self, gv: str, plural: str) -> ResourceType:
        group, _, version = gv.rpartition("/")
        return self.core.type_for(group, version, plural)  # type: ignore[union-attr]

    def objects(self, gv: str, plural: str, namespace: str | None = None) -> list[dict]:
        """A read-only snapshot (deep copies) of the stored objects, as a list would return them."""
        return self._call(lambda: self.core.objects(self._rt(gv, plural), namespace))

    def stored(self, gv: str, plural: str, namespace: str | None, name: str) -> dict | None:
        """The object as stored (before read-time defaulting), for tests of storage semantics."""
        def get():
            rt = self._rt(gv, plural)
            s = self.core.storage(rt).objects.get((namespace or "", name))
            return jcopy(s.raw) if s else None
        return self._call(get)

    def compact(self, keep: int = 0) -> None:
        self._call(self.core.compact, keep)

    def install_crd(self, doc: dict) -> None:
        self._call(self.core.install_crd, jcopy(doc))

    @property
    def audit(self) -> set:
        """A copy of the (user agent, verb, group, resource[/subresource]) set recorded so far."""
        return self._call(lambda: set(self.core.audit)) if self.core else set()

    @property
    def resource_version(self) -> int:
        return self.core.rv if self.core else 0

    def write_kubeconfig(self, path: Path | str, namespace: str = "default") -> Path:
        """A kubeconfig for kopf and the kubernetes client: plain HTTP, no credentials."""
        path = Path(path)
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "testcluster", "cluster": {"server": self.url}}],
            "users": [{"name": "testcluster", "user": {}}],
            "contexts": [{"name": "testcluster", "context": {"cluster": "testcluster", "user": "testcluster",
                                                             "namespace": namespace}}],
            "current-context": "testcluster",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path
