"""A small asyncio client for the few Kubernetes calls the operator makes (create, get, list, merge-patch,
delete, events). aiohttp is already kopf's transport; the credentials come from kopf's login
(``kopf.ConnectionInfo``), so both talk to the same API server the same way."""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, Awaitable, Callable

import aiohttp

from ..api.common import API_VERSION
from ..api.resources import KIND_INFO
from ..api.timefmt import format_time

log = logging.getLogger("branchmerge.operator")

# kind -> (API prefix, plural)
CORE = {"ConfigMap": ("/api/v1", "configmaps"), "Service": ("/api/v1", "services"), "Pod": ("/api/v1", "pods"),
        "Event": ("/api/v1", "events"), "Job": ("/apis/batch/v1", "jobs"),
        "Workload": ("/apis/kueue.x-k8s.io/v1beta1", "workloads")}
CORE.update({kind: (f"/apis/{API_VERSION}", info.plural) for kind, info in KIND_INFO.items()})


class ApiError(Exception):
    def __init__(self, status: int, body: str, what: str):
        self.status = status
        super().__init__(f"{what}: HTTP {status}: {body[:300]}")


def path(kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    prefix, plural = CORE[kind]
    url = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    if name:
        url += f"/{name}"
    if sub:
        url += f"/{sub}"
    return url


class KubeClient:
    """``connect`` returns a ``kopf.ConnectionInfo``; it is called again once on HTTP 401 (rotated token)."""

    RETRY_STATUSES = (429, 500, 502, 503, 504)

    def __init__(self, connect: Callable[[], Awaitable[Any]]):
        self._connect = connect
        self._session: aiohttp.ClientSession | None = None
        self._server = ""

    async def _open(self) -> None:
        info = await self._connect()
        if self._session is not None:
            await self._session.close()
        self._server = info.server.rstrip("/")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, ssl=info.as_ssl_context()),
            headers={**info.as_http_headers(), "User-Agent": "branchmerge-operator"},
            timeout=aiohttp.ClientTimeout(total=30))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, url: str, body: Any = None, content_type: str = "application/json",
                      params: dict | None = None, ok404: bool = False) -> dict | None:
        if self._session is None:
            await self._open()
        # allow_nan=False: kube-apiserver rejects NaN/Infinity; fail here, naming the request, not with a 400
        data = json.dumps(body, allow_nan=False) if body is not None else None
        relogged = False
        for attempt in range(4):
            assert self._session is not None
            try:
                async with self._session.request(method, self._server + url, data=data, params=params,
                                                 headers={"Content-Type": content_type}) as resp:
                    text = await resp.text()
                    if resp.status == 401 and not relogged:
                        relogged = True
                        await self._open()
                        continue
                    if resp.status in self.RETRY_STATUSES and attempt < 3:
                        await asyncio.sleep(0.2 * 2 ** attempt)
                        continue
                    if resp.status == 404 and ok404:
                        return None
                    if resp.status >= 400:
                        raise ApiError(resp.status, text, f"{method} {url}")
                    return json.loads(text) if text else {}
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                if attempt == 3:
                    raise
                await asyncio.sleep(0.2 * 2 ** attempt)
        raise ApiError(599, "retries exhausted", f"{method} {url}")

    # ---- verbs ----------------------------------------------------------------------------------------

    async def create(self, obj: dict) -> tuple[dict | None, bool]:
        """Create if absent: (object or None, created?). (None, False) on 409 AlreadyExists: an object of
        that name exists -- not necessarily the caller's: a deleted CR's children keep their names until the
        garbage collector removes them, so the caller checks the owner before relying on it."""
        meta = obj["metadata"]
        try:
            return await self.request("POST", path(obj["kind"], meta.get("namespace")), obj), True
        except ApiError as err:
            if err.status == 409:
                return None, False
            raise

    async def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return await self.request("GET", path(kind, namespace, name), ok404=True)

    async def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        doc = await self.request("GET", path(kind, namespace), params={"labelSelector": selector}) or {}
        # Filter here too: selectors are an optimisation the server may not apply (e.g. emulators).
        return [o for o in doc.get("items", [])
                if all((o.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in labels.items())]

    async def events_of(self, namespace: str, uid: str) -> list[dict]:
        """The Events about one object (by uid: a namesake's are not its)."""
        doc = await self.request("GET", path("Event", namespace),
                                 params={"fieldSelector": f"involvedObject.uid={uid}"}) or {}
        return [e for e in doc.get("items", []) if (e.get("involvedObject") or {}).get("uid") == uid]

    async def list_at(self, kind: str, namespace: str, labels: dict[str, str] | None = None
                      ) -> tuple[list[dict], int | None]:
        """Every object of ``kind`` in ``namespace`` (all pages) and the list's resourceVersion (None if not
        numeric): what a resync compares the watch-fed store with."""
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in (labels or {}).items())} if labels else {}
        items: list[dict] = []
        version = None
        while True:
            doc = await self.request("GET", path(kind, namespace), params={**params, "limit": "500"}) or {}
            items += doc.get("items", [])
            meta = doc.get("metadata") or {}
            version = version or meta.get("resourceVersion")
            if not meta.get("continue"):
                break
            params["continue"] = meta["continue"]
        items = [o for o in items if all((o.get("metadata", {}).get("labels") or {}).get(k) == v
                                         for k, v in (labels or {}).items())]
        return items, int(version) if isinstance(version, str) and version.isdigit() else None

    async def patch(self, kind: str, namespace: str, name: str, patch: dict, sub: str | None = None) -> dict | None:
        return await self.request("PATCH", path(kind, namespace, name, sub), patch,
                                  content_type="application/merge-patch+json", ok404=True)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        await self.request("DELETE", path(kind, namespace, name), {"propagationPolicy": "Background"}, ok404=True)

    async def event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on a CR (what ``kubectl describe`` shows)."""
        meta = involved["metadata"]
        stamp = format_time()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta.get("namespace")},
            "involvedObject": {"apiVersion": involved.get("apiVersion", API_VERSION), "kind": involved["kind"],
                               "name": meta["name"], "namespace": meta.get("namespace"), "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "source": {"component": "branchmerge-operator"}, "reportingComponent": "branchmerge-operator",
        }
        try:
            await self.request("POST", path("Event", meta.get("namespace")), event)
        except ApiError as err:  # events are best effort
            log.warning("could not post event %s on %s/%s: %s", reason, involved["kind"], meta["name"], err)
