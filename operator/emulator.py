"""A Kubernetes API emulator realistic enough for kopf (tests and bench/operator.py; needs kmock==0.8,
the dev extra). Stock ``kmock.KubernetesEmulator`` 0.8 stores objects and streams watches; this subclass
adds what kopf and the operator rely on:

- server metadata: ``uid``, ``resourceVersion`` (a global counter), ``generation`` (bumped on spec
  changes only), ``creationTimestamp``, the namespace from the URL;
- PATCH semantics: merge and JSON patches, a failed JSON-patch ``test`` answers 422 (kopf retries on it),
  no-op patches change nothing (no new resourceVersion, no watch event), the ``/status`` subresource
  changes only ``status`` and the main resource never does (for kinds declared with ``status``);
- lists with ``kind``/``apiVersion``/``resourceVersion``, equality label selectors on lists, ``/api/v1``
  with groupVersion ``v1``, watch streams served as ``application/json``;
- garbage collection: deleting an owner deletes the objects whose ownerReferences name its uid;
- constant-time requests: O(1) fetch by key, a bounded request log and object history (stock kmock
  scans every logged request per request, which makes a 200-CR benchmark quadratic).
Not emulated: resourceVersion conflicts/410, PUT, generateName, admission and schema validation.
"""
from __future__ import annotations

import asyncio
import copy
import itertools
import threading
import uuid
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import dicts, enums, rendering

from ..api.common import GROUP, VERSION
from ..api.resources import KIND_INFO
from ..api.timefmt import format_time


def _essence(obj: dict) -> dict:
    """What decides the generation: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


@attrs.define(kw_only=True)
class RealisticEmulator(kmock.KubernetesEmulator):
    _rv: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    audit: set = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        info = kmock.ResourceInfo
        for kind, meta in KIND_INFO.items():
            self.resources[f"{GROUP}/{VERSION}/{meta.plural}"] = info(
                kind=kind, singular=kind.lower(), namespaced=True, subresources={"status"},
                verbs={"get", "list", "watch", "create", "patch", "delete"}, shortnames=set(meta.short_names))
        verbs = {"get", "list", "watch", "create", "patch", "delete"}
        self.resources["batch/v1/jobs"] = info(kind="Job", singular="job", namespaced=True,
                                               subresources={"status"}, verbs=verbs)
        for plural, kind, subs in (("pods", "Pod", {"status"}), ("configmaps", "ConfigMap", set()),
                                   ("services", "Service", {"status"}), ("events", "Event", set()),
                                   ("namespaces", "Namespace", {"status"})):
            self.resources[f"v1/{plural}"] = info(kind=kind, singular=kind.lower(), namespaced=plural != "namespaces",
                                                  subresources=subs, verbs=verbs)
        self.resources["kopf.dev/v1/kopfpeerings"] = info(kind="KopfPeering", singular="kopfpeering",
                                                          namespaced=True, verbs=verbs)
        self.resources["kopf.dev/v1/clusterkopfpeerings"] = info(kind="ClusterKopfPeering",
                                                                 singular="clusterkopfpeering", namespaced=False,
                                                                 verbs=verbs)

    # ---- helpers --------------------------------------------------------------------------------------

    def _next_rv(self) -> str:
        return str(next(self._rv))

    def _has_status(self, resource) -> bool:
        try:
            return "status" in self.resources[resource].subresources
        except KeyError:
            return False

    def _kind(self, resource) -> str | None:
        try:
            return self.resources[resource].kind
        except KeyError:
            return None

    async def _publish(self, resource, type_: str, raw: dict) -> None:
        await self._buses[resource].put({"type": type_, "object": raw})

    # ---- requests -------------------------------------------------------------------------------------

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # kmock logs every request for assertions and matches a new one by scanning that log (quadratic
        # over a long run); nothing here asserts on it, so keep only the request being served.
        if len(self._requests) > 1:
            del self._requests[:-1]
        if request.resource is None:
            return await super()._handle(request)
        self._audit(request)
        try:
            # The object verbs are served here directly (kmock's generic reaction matching costs
            # ~10 ms per request); discovery and watch streams go through kmock.
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                return aiohttp.web.json_response(await self._create(request), status=201)
            elif request.action == enums.action.FETCH and request.name is not None and not request.subresource:
                return aiohttp.web.json_response(await self._serve_fetch(request))
            elif request.action == enums.action.UPDATE and request.name is not None:
                return aiohttp.web.json_response(await self._patch(request))
            elif request.action == enums.action.DELETE and request.name is not None:
                return await self._delete(request)
        except kmock.KubernetesError as err:
            return await self._render_error(err)
        return await super()._handle(request)

    def _audit(self, request: rendering.Request) -> None:
        """Record (client, RBAC verb, group, resource[/subresource]) of each request, for RBAC checks."""
        if not request.resource.plural:  # discovery: open to every authenticated client
            return
        method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
        if method == "GET":
            verb = "watch" if request.params.get("watch") in ("true", "1") else "get" if request.name else "list"
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method, method)
        client = (request.headers.get("User-Agent") or "").split("/")[0]
        what = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        self.audit.add((client, verb, request.resource.group, what))

    def _stamp_new(self, request: rendering.Request) -> dict:
        data = copy.deepcopy(request.data)
        meta = data.setdefault("metadata", {})
        if request.namespace:
            meta["namespace"] = request.namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), generation=1,
                    creationTimestamp=format_time())
        kind = self._kind(request.resource)
        if kind:
            data.setdefault("kind", kind)
            group, version = request.resource.group, request.resource.version
            data.setdefault("apiVersion", f"{group}/{version}" if group else version)
        return data

    async def _create(self, request: rendering.Request) -> dict:
        data = self._stamp_new(request)
        meta = data["metadata"]
        if not meta.get("name"):
            raise kmock.KubernetesError(status=422, reason="Invalid",
                                        message="metadata.name: required (generateName is not emulated)")
        key = (request.resource, meta.get("namespace") or request.namespace, meta["name"])
        async with self._lock:
            if key in self._objects and not self._objects[key].deleted:
                raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                            message=f"{meta['name']} already exists")
            if key in self._objects:
                self._objects[key].create(data)
                del self._objects[key].history[:-1]
            else:
                self._objects[key] = data
            await self._publish(request.resource, "ADDED", data)
        return data

    def _live(self, key):
        """The stored object at ``key``; 404 when absent or already deleted (caller holds the lock)."""
        if key not in self._objects or self._objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return self._objects[key]

    async def _patch(self, request: rendering.Request) -> dict:
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            obj = self._live(key)
            current = copy.deepcopy(obj.raw)
            patch = request.data
            if isinstance(patch, list):
                try:
                    new = jsonpatch.apply_patch(copy.deepcopy(current), patch)
                except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as err:
                    raise kmock.KubernetesError(status=422, reason="Invalid", message=str(err))
            elif isinstance(patch, dict):
                new = dicts.merge_patch_dict(copy.deepcopy(current), patch)
            else:
                raise kmock.KubernetesError(status=415, reason="UnsupportedMediaType", message="bad patch body")
            if self._has_status(request.resource):
                if request.subresource == "status":
                    new = {**current, "status": new.get("status")} if new.get("status") is not None else \
                        {k: v for k, v in current.items() if k != "status"}
                elif "status" in current:
                    new["status"] = current["status"]
                else:
                    new.pop("status", None)
            for field in ("uid", "creationTimestamp", "name", "namespace", "resourceVersion", "generation"):
                if field in current.get("metadata", {}):
                    new.setdefault("metadata", {})[field] = current["metadata"][field]
            if new == current:
                return current  # a no-op: no new version, no event
            if _essence(new) != _essence(current):
                new["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
            new["metadata"]["resourceVersion"] = self._next_rv()
            obj.history.append(new)
            del obj.history[:-2]  # bounded memory: long runs patch statuses thousands of times
            meta = new["metadata"]
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                obj.delete()
                await self._publish(request.resource, "DELETED", new)
                await self._collect_garbage(meta.get("uid"))
            else:
                await self._publish(request.resource, "MODIFIED", new)
            return new

    async def _delete(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            obj = self._live(key)
            current = copy.deepcopy(obj.raw)
            meta = current.setdefault("metadata", {})
            if meta.get("finalizers"):
                if not meta.get("deletionTimestamp"):
                    meta["deletionTimestamp"] = format_time()
                    meta["resourceVersion"] = self._next_rv()
                    obj.history.append(current)
                    await self._publish(request.resource, "MODIFIED", current)
                return aiohttp.web.json_response(current)
            meta["resourceVersion"] = self._next_rv()
            obj.delete()
            await self._publish(request.resource, "DELETED", current)
            await self._collect_garbage(meta.get("uid"))
        return aiohttp.web.json_response(current)

    async def _collect_garbage(self, owner_uid: str | None) -> None:
        """Delete dependents of a deleted owner (what kube-controller-manager's GC does), recursively.
        Called with the lock held."""
        pending = [owner_uid] if owner_uid else []
        while pending:
            uid = pending.pop()
            for (resource, _, _), obj in list(self._objects.items()):
                if obj.deleted:
                    continue
                raw = obj.raw
                refs = raw.get("metadata", {}).get("ownerReferences") or []
                if any(ref.get("uid") == uid for ref in refs):
                    gone = copy.deepcopy(raw)
                    gone["metadata"]["resourceVersion"] = self._next_rv()
                    obj.delete()
                    await self._publish(resource, "DELETED", gone)
                    pending.append(gone["metadata"].get("uid"))

    # ---- reads ----------------------------------------------------------------------------------------

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        """O(1) by key (the stock fetch scans every stored object)."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key in self._objects and not self._objects[key].deleted:
                return self._objects[key].raw
        raise kmock.KubernetesObjectNotFoundError()

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        doc = await super()._serve_list(request)
        kind = self._kind(request.resource) or "Object"
        group, version = request.resource.group, request.resource.version
        selector = request.params.get("labelSelector")
        items = doc["items"]
        if selector:
            wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part)
            items = [o for o in items if all((o.get("metadata", {}).get("labels") or {}).get(k) == v
                                             for k, v in wanted.items())]
        return {"apiVersion": f"{group}/{version}" if group else version, "kind": f"{kind}List",
                "metadata": {"resourceVersion": str(next(self._rv))}, "items": items}

    async def _serve_watch(self, request: rendering.Request):  # type: ignore[override]
        return rendering.Response(headers={"Content-Type": "application/json"},
                                  payload=super()._serve_watch(request))

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        doc = await super()._serve_version(request)
        if request.resource is not None and request.resource.group == "":
            doc["groupVersion"] = request.resource.version
        return doc


class EmulatorThread:
    """The emulator served over HTTP from its own thread and event loop (kopf runs in another)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.emulator: RealisticEmulator | None = None
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)

    def __enter__(self) -> "EmulatorThread":
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with RealisticEmulator() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = f"http://{server.host}:{server.port}"
            self._ready.set()
            await self._stop.wait()


class OperatorThread:
    """The operator (kopf + workers) in its own thread and event loop, logged in to ``server``."""

    def __init__(self, server: str, opts=None, namespaces=("default",), clusterwide: bool = False,
                 metrics_port: int | None = 0, peering: str | None = None, priority: int = 0,
                 workers: int = 8, error_backoff: float = 0.5):
        import kopf

        from .controller import Operator
        from .options import OperatorOptions

        async def connect():
            return kopf.ConnectionInfo(server=server, default_namespace=namespaces[0] if namespaces else None)

        self.operator = Operator(opts or OperatorOptions(), connect, workers=workers, error_backoff=error_backoff)
        self.kwargs = dict(namespaces=() if clusterwide else tuple(namespaces), clusterwide=clusterwide,
                           peering=peering, priority=priority)
        self.metrics_port = metrics_port
        self.metrics_server = None
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="operator", daemon=True)

    def __enter__(self) -> "OperatorThread":
        from .metrics import serve_metrics

        if self.metrics_port is not None:
            self.metrics_server = serve_metrics(self.operator.metrics.registry, self.metrics_port, "127.0.0.1")
        self._thread.start()
        if not self.ready_flag.wait(30):
            raise RuntimeError(f"the operator did not start: {self.error!r}")
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        self._thread.join(30)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_server.server_port}/metrics"

    def _run(self) -> None:
        from .controller import run_operator

        try:
            asyncio.run(run_operator(self.operator, stop_flag=self.stop_flag, ready_flag=self.ready_flag,
                                     **self.kwargs))
        except BaseException as err:  # surfaced by __enter__ / the tests
            self.error = err
            self.ready_flag.set()


class Api:
    """A blocking JSON client for tests and benchmarks (urllib; plays kubectl and the kubelet)."""

    def __init__(self, server: str):
        self.server = server.rstrip("/")

    def call(self, method: str, path: str, body=None, content_type: str = "application/json"):
        import json
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read()
                return json.loads(text) if text else None
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    @staticmethod
    def path(kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        from .kube import path

        return path(kind, namespace, name, sub)

    def create(self, obj: dict, namespace: str = "default") -> dict:
        return self.call("POST", self.path(obj["kind"], obj["metadata"].get("namespace", namespace)), obj)

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return self.call("GET", self.path(kind, namespace, name))

    def list(self, kind: str, namespace: str) -> list[dict]:
        return (self.call("GET", self.path(kind, namespace)) or {}).get("items", [])

    def patch(self, kind: str, namespace: str, name: str, patch, sub: str | None = None) -> dict | None:
        ctype = "application/json-patch+json" if isinstance(patch, list) else "application/merge-patch+json"
        return self.call("PATCH", self.path(kind, namespace, name, sub), patch, ctype)

    def delete(self, kind: str, namespace: str, name: str) -> dict | None:
        return self.call("DELETE", self.path(kind, namespace, name))
