"""The API server stand-in's state and verbs (create, get, list, watch, update, patch, delete) in
kube-apiserver's order; see testcluster/apiserver.py for what is and is not emulated."""
from __future__ import annotations

import asyncio
import base64
import datetime
import json
import random
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import yaml

from . import admission
from . import meta as metav
from .builtins import builtin_types, now
from .resources import ResourceType, crd_type
from .schema import FieldError
from .selectors import SelectorError, parse_fields, parse_labels
from .store import Event, Storage, Stored, Watcher, dumps, jcopy
from .patches import PatchError, json_patch, merge_patch
from .statuses import StatusError, _details, bad_request, conflict, invalid, not_found

GENERATE_NAME_ATTEMPTS = 8


def _parse_time(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _stamp(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")



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
        self._refreshing = False
        for rt in builtin_types():
            self.register(rt)
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(self.type_for("", "v1", "namespaces"), None, {"metadata": {"name": ns}})
        for name, description in (("system-cluster-critical", "Used for system critical pods that must run in the "
                                   "cluster, but can be moved to another node if necessary."),
                                  ("system-node-critical", "Used for system critical pods that must not be moved "
                                   "from their current node.")):
            self.create(self.type_for("scheduling.k8s.io", "v1", "priorityclasses"), None, {
                "metadata": {"name": name}, "value": admission.SYSTEM_PRIORITY_CLASSES[name], "globalDefault": False,
                "description": description})
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
        is_pod = rt.plural == "pods" and not rt.group
        if is_pod:  # mutating admission: before the name is generated
            admission.admit_service_account(obj, ns or "", self.lookup)
            admission.admit_priority(obj, self.lookup_all)
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
        if is_pod:  # validating admission
            admission.admit_quota(candidate, self.lookup_all("", "v1", "resourcequotas", ns),
                                  self.lookup_all("", "v1", "pods", ns), time.time())
        elif rt.plural == "priorityclasses" and rt.group == "scheduling.k8s.io":
            admission.validate_priority_class_create(candidate, self.lookup_all)
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
        if rt.plural == "pods" and not rt.group:
            self.refresh_quotas(ns)
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
            if rt.plural == "pods" and not rt.group:
                self.refresh_quotas(key[0])
        if rt.plural == "resourcequotas" and not rt.group and prev.get("spec") != new.get("spec"):
            self.refresh_quotas(key[0])
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
        if rt.plural == "pods" and not rt.group:
            self.refresh_quotas(key[0])
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
        if rt.plural == "priorityclasses" and name in admission.SYSTEM_PRIORITY_CLASSES:
            raise StatusError(403, "Forbidden", f'priorityclasses.scheduling.k8s.io "{name}" is forbidden: this is '
                              "a system priority class and cannot be deleted",
                              {"name": name, "group": "scheduling.k8s.io", "kind": "priorityclasses"})
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

    # ---- admission helpers ----------------------------------------------------------------------------------

    def lookup(self, group: str, version: str, plural: str, ns: str | None, name: str) -> dict | None:
        """The stored object as read (None when absent), for admission."""
        rt = self.type_for(group, version, plural)
        stored = self.storage(rt).objects.get((ns or "", name))
        return self.view(rt, stored) if stored is not None else None

    def lookup_all(self, group: str, version: str, plural: str, ns: str | None) -> list[dict]:
        rt = self.type_for(group, version, plural)
        objects = self.storage(rt).objects
        return [self.view(rt, objects[k]) for k in sorted(objects) if ns is None or k[0] == (ns or "")]

    def refresh_quotas(self, ns: str) -> None:
        """Bring ``status`` (hard, used) of the namespace's ResourceQuotas up to date: the quota controller's
        part, done at once on every change that moves usage."""
        if self._refreshing or not ns:
            return
        rt = self.type_for("", "v1", "resourcequotas")
        objects = self.storage(rt).objects
        keys = [k for k in objects if k[0] == ns]
        if not keys:
            return
        pods = self.lookup_all("", "v1", "pods", ns)
        self._refreshing = True
        try:
            for key in keys:
                stored = objects[key]
                quota = self.view(rt, stored)
                status = admission.quota_status(quota, pods, time.time())
                if quota.get("status") != status:
                    self._commit_update(rt, stored, {**jcopy(quota), "status": status})
        finally:
            self._refreshing = False

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
