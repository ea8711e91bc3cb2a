"""The API server stand-in's HTTP side: routing of Kubernetes REST paths onto ``Core``, discovery documents,
watch streams, pods/log, fault injection and the audit set."""
from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path
from typing import Any

import aiohttp.web

from .faults import Faults
from .resources import ResourceType
from .store import Watcher, dumps
from .tokens import Tokens
from .core import Core
from .statuses import StatusError, bad_request, decode_json

log = logging.getLogger("testcluster.apiserver")
JSON = "application/json"
PATCH_TYPES = {"application/merge-patch+json": "merge", "application/json-patch+json": "json",
               "application/strategic-merge-patch+json": "strategic", "application/apply-patch+yaml": "apply"}


def _json_response(body: Any, status: int = 200, headers: dict | None = None) -> aiohttp.web.Response:
    text = body if isinstance(body, str) else dumps(body)
    return aiohttp.web.Response(text=text, status=status, content_type=JSON, headers=headers)


def _flag(value: str | None) -> bool:
    return value in ("true", "1", "True")


class Http:
    """Routes requests to the core."""

    def __init__(self, core: Core, faults: Faults, version: dict):
        self.core, self.faults, self.version = core, faults, version
        self.tokens = Tokens(core)

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
        if rt.plural == "tokenreviews" and rt.group == "authentication.k8s.io":
            if method != "POST" or name is not None:
                raise StatusError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            return _json_response(self.tokens.review(decode_json(await request.read())), 201)
        if method == "POST":
            body = decode_json(await request.read())
            if sub == "token" and rt.plural == "serviceaccounts":
                return _json_response(self.tokens.request(ns, name, body), 201)
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
