"""An asyncio Kubernetes client (aiohttp) for the test cluster's components: the Job controller and the
node stand-in talk to the API server stand-in only through it, over real HTTP/JSON.

``Client`` maps the REST verbs one to one (get, list, create, replace, patch, delete, watch) and raises
``ApiError`` with the server's ``Status`` reason/message on a status >= 400. ``Informer`` is the
list-then-watch loop of client-go's reflector: it keeps a cache, relists on 410 Gone and synthesises
DELETED events for objects that disappeared while it was not watching.

Not emulated: authentication (the stand-in is plain HTTP), protobuf, client-side rate limiting,
server-side apply, client-go's resync period and its shared-informer fan-out (each Informer has its own
watch), watch-list streaming (``sendInitialEvents``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp

log = logging.getLogger("testcluster.client")

PATCH_TYPES = {"merge": "application/merge-patch+json", "json": "application/json-patch+json",
               "strategic": "application/strategic-merge-patch+json"}
RETRYABLE = (429, 500, 502, 503, 504)
# What a request can fail with besides ApiError: the connection lost or refused, or the client's timeout.
TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


class ApiError(Exception):
    """A response with status >= 400; ``reason``/``message`` come from the server's Status object."""

    def __init__(self, status: int, reason: str = "", message: str = "", body: dict | None = None):
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body or {}
        super().__init__(f"HTTP {status} {reason}: {message}")


class Gone(ApiError):
    """The watch's resourceVersion is older than the server's history window (410): relist."""

    def __init__(self, message: str = "too old resource version", body: dict | None = None):
        super().__init__(410, "Expired", message, body)


def api_path(gv: str, plural: str, namespace: str | None = None, name: str | None = None,
             sub: str | None = None) -> str:
    """``/api/v1/...`` for the core group, ``/apis/<group>/<version>/...`` for the others."""
    prefix = "/api/v1" if gv == "v1" else f"/apis/{gv}"
    url = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    if name:
        url += f"/{name}"
    if sub:
        url += f"/{sub}"
    return url


def _error_from(status: int, text: str) -> ApiError:
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("kind") == "Status":
        return ApiError(status, doc.get("reason", ""), doc.get("message", ""), doc)
    return ApiError(status, "", text[:500])


class Client:
    """One aiohttp session per client, opened lazily inside the running loop (the constructor may run
    in another thread than the loop that uses it)."""

    def __init__(self, url: str, user_agent: str = "testcluster", timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.user_agent = user_agent
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100),
                headers={"User-Agent": self.user_agent, "Accept": "application/json"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                      params: dict | None = None, raw: bool = False) -> Any:
        """One HTTP call; JSON in and out (``raw=True``: the response text). Raises ApiError on >= 400."""
        data = json.dumps(body) if body is not None else None
        params = {k: v for k, v in (params or {}).items() if v is not None}
        async with self._sess().request(method, self.url + path, data=data, params=params,
                                        headers={"Content-Type": content_type},
                                        timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise _error_from(resp.status, text)
            if raw:
                return text
            return json.loads(text) if text else None

    # ---- verbs ----------------------------------------------------------------------------------------

    async def get(self, gv: str, plural: str, namespace: str | None, name: str) -> dict | None:
        try:
            return await self.request("GET", api_path(gv, plural, namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def list(self, gv: str, plural: str, namespace: str | None = None, *, label_selector: str | None = None,
                   field_selector: str | None = None, limit: int | None = None) -> tuple[list[dict], str]:
        """All items (following ``continue`` tokens when ``limit`` pages them, with kind/apiVersion filled in)
        and the list's resourceVersion."""
        items: list[dict] = []
        token = None
        while True:
            doc = await self.request("GET", api_path(gv, plural, namespace), params={
                "labelSelector": label_selector, "fieldSelector": field_selector,
                "limit": str(limit) if limit else None, "continue": token})
            # Typed lists of built-in kinds carry no kind/apiVersion on their items: fill them in, as kopf does.
            kind = (doc.get("kind") or "").removesuffix("List")
            for item in doc.get("items") or []:
                item.setdefault("apiVersion", doc.get("apiVersion", gv))
                if kind:
                    item.setdefault("kind", kind)
                items.append(item)
            meta = doc.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, meta.get("resourceVersion", "")

    async def create(self, gv: str, plural: str, namespace: str | None, obj: dict) -> dict:
        return await self.request("POST", api_path(gv, plural, namespace), obj)

    async def replace(self, gv: str, plural: str, namespace: str | None, name: str, obj: dict,
                      sub: str | None = None) -> dict:
        return await self.request("PUT", api_path(gv, plural, namespace, name, sub), obj)

    async def patch(self, gv: str, plural: str, namespace: str | None, name: str, patch: Any, *,
                    sub: str | None = None, patch_type: str = "merge") -> dict | None:
        """``patch_type``: "merge" (RFC 7386), "json" (RFC 6902) or "strategic". None on 404."""
        try:
            return await self.request("PATCH", api_path(gv, plural, namespace, name, sub), patch,
                                      content_type=PATCH_TYPES[patch_type])
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def delete(self, gv: str, plural: str, namespace: str | None, name: str, *,
                     propagation: str | None = None, grace_seconds: int | None = None,
                     preconditions: dict | None = None) -> dict | None:
        """The server's answer (the object, or a Status for kinds that return none); None on 404."""
        options: dict = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation is not None:
            options["propagationPolicy"] = propagation
        if grace_seconds is not None:
            options["gracePeriodSeconds"] = grace_seconds
        if preconditions:
            options["preconditions"] = preconditions
        try:
            return await self.request("DELETE", api_path(gv, plural, namespace, name), options)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def delete_collection(self, gv: str, plural: str, namespace: str | None, *,
                                label_selector: str | None = None, field_selector: str | None = None,
                                propagation: str | None = None) -> dict:
        options = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation is not None:
            options["propagationPolicy"] = propagation
        return await self.request("DELETE", api_path(gv, plural, namespace), options,
                                  params={"labelSelector": label_selector, "fieldSelector": field_selector})

    # ---- pod helpers (the node stand-in's calls) --------------------------------------------------------

    async def bind(self, namespace: str, pod: str, node: str) -> dict:
        """POST pods/<name>/binding, as kube-scheduler does."""
        body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod, "namespace": namespace},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        return await self.request("POST", api_path("v1", "pods", namespace, pod, "binding"), body)

    async def register_log(self, namespace: str, pod: str, container: str, path: str) -> None:
        """Tell the server where a container's log file lives (the stand-in's extension of the kubelet's
        log endpoint: ``GET pods/<name>/log`` then serves that file)."""
        await self.request("PUT", f"/testcluster/v1/namespaces/{namespace}/pods/{pod}/logs/{container}",
                           {"path": path})

    async def read_log(self, namespace: str, pod: str, container: str | None = None, *,
                       tail_lines: int | None = None, previous: bool = False) -> str:
        return await self.request("GET", api_path("v1", "pods", namespace, pod, "log"), raw=True, params={
            "container": container, "tailLines": str(tail_lines) if tail_lines is not None else None,
            "previous": "true" if previous else None})

    # ---- watch ----------------------------------------------------------------------------------------

    async def watch(self, gv: str, plural: str, namespace: str | None = None, *, resource_version: str | None,
                    label_selector: str | None = None, field_selector: str | None = None, bookmarks: bool = True,
                    timeout_seconds: int | None = None) -> AsyncIterator[tuple[str, dict]]:
        """(type, object) per event, BOOKMARKs included; ends when the server closes the stream.
        Raises Gone on a 410 ERROR event, ApiError on any other ERROR event or status >= 400."""
        params = {"watch": "true", "resourceVersion": resource_version, "labelSelector": label_selector,
                  "fieldSelector": field_selector, "allowWatchBookmarks": "true" if bookmarks else None,
                  "timeoutSeconds": str(timeout_seconds) if timeout_seconds is not None else None}
        params = {k: v for k, v in params.items() if v is not None}
        # No read timeout: a quiet watch is legitimate (bookmarks come every few seconds at most).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=None)
        async with self._sess().get(self.url + api_path(gv, plural, namespace), params=params,
                                    timeout=timeout) as resp:
            if resp.status >= 400:
                raise _error_from(resp.status, await resp.text())
            buffer = b""
            # Split on newlines ourselves: StreamReader.readline caps a line at the read buffer size.
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield self._event(line)
            if buffer.strip():
                yield self._event(buffer)

    @staticmethod
    def _event(line: bytes) -> tuple[str, dict]:
        event = json.loads(line)
        type_, obj = event.get("type", ""), event.get("object") or {}
        if type_ == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", ""), obj)
            raise ApiError(int(obj.get("code") or 500), obj.get("reason", ""), obj.get("message", ""), obj)
        return type_, obj


def _key(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name", "")


class Informer:
    """List, then watch from the list's resourceVersion; keep ``cache`` current and call ``on_event``
    (type, object) for every change: ADDED/MODIFIED/DELETED. After a 410 (or a watch that cannot be
    resumed) it relists and diffs the new list against the cache: new objects → ADDED, changed
    resourceVersions → MODIFIED, missing ones → DELETED (synthesised with the last known state, like
    client-go's DeletedFinalStateUnknown). Transient errors (5xx, 429, connection loss) retry with backoff."""

    def __init__(self, client: Client, gv: str, plural: str, namespace: str | None = None, *,
                 label_selector: str | None = None, field_selector: str | None = None,
                 on_event: Callable[[str, dict], Awaitable[None]] | None = None,
                 backoff: tuple[float, float] = (0.05, 2.0)):
        self.client = client
        self.gv, self.plural, self.namespace = gv, plural, namespace
        self.label_selector, self.field_selector = label_selector, field_selector
        self.on_event = on_event
        self.cache: dict[tuple[str, str], dict] = {}
        self.resource_version = ""
        self.relists = 0
        self._backoff = backoff
        self._synced = asyncio.Event()

    async def synced(self) -> None:
        await self._synced.wait()

    async def _emit(self, type_: str, obj: dict) -> None:
        if self.on_event is not None:
            try:
                await self.on_event(type_, obj)
            except asyncio.CancelledError:
                raise
            except Exception:  # a handler's bug must not stop the informer
                log.exception("%s informer: handler failed on %s %s", self.plural, type_, _key(obj))

    async def _relist(self) -> None:
        items, rv = await self.client.list(self.gv, self.plural, self.namespace,
                                           label_selector=self.label_selector, field_selector=self.field_selector)
        self.relists += 1
        fresh = {_key(o): o for o in items}
        old = self.cache
        self.cache = dict(fresh)
        self.resource_version = rv
        for key, obj in fresh.items():
            before = old.get(key)
            if before is None:
                await self._emit("ADDED", obj)
            elif (before.get("metadata") or {}).get("resourceVersion") != (obj.get("metadata") or {}).get(
                    "resourceVersion"):
                await self._emit("MODIFIED", obj)
        for key, obj in old.items():
            if key not in fresh:
                await self._emit("DELETED", obj)
        self._synced.set()

    async def _watch(self) -> None:
        async for type_, obj in self.client.watch(
                self.gv, self.plural, self.namespace, resource_version=self.resource_version,
                label_selector=self.label_selector, field_selector=self.field_selector, bookmarks=True):
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            if rv:
                self.resource_version = rv
            if type_ == "BOOKMARK":
                continue
            key = _key(obj)
            if type_ == "DELETED":
                self.cache.pop(key, None)
            else:
                self.cache[key] = obj
            await self._emit(type_, obj)

    async def run(self) -> None:
        """Until cancelled."""
        delay = self._backoff[0]
        need_list = True
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                await self._watch()  # a normal end (timeout, server closed): resume from the last RV
                delay = self._backoff[0]
            except asyncio.CancelledError:
                raise
            except Gone:
                need_list = True
            except ApiError as err:
                log.debug("%s informer: %s; retrying in %.2fs", self.plural, err, delay)
                if err.status not in RETRYABLE:
                    need_list = True
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._backoff[1])
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, ValueError) as err:
                log.debug("%s informer: %r; retrying in %.2fs", self.plural, err, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._backoff[1])
