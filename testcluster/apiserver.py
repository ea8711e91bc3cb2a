"""The API server stand-in: Kubernetes HTTP/JSON on 127.0.0.1 (and on further addresses given to ``listen``:
a node's pod-network gateway), from scratch on aiohttp.web, loaded with the committed CRDs. This module
runs it (thread or caller's loop); ``core`` holds the state and verbs, ``http`` the REST routing and
watch streams, ``statuses`` and ``patches`` the failure answers and patch formats. What kopf
1.45, the operator's client, the Job controller and the kubelet stand-ins rely on:

- discovery (``/api``, ``/apis``, ``/api/v1``, ``/apis/<group>[/<version>]``, ``/version``, ``/healthz``);
- the request pipeline, in kube-apiserver's order: decode (JSON only; malformed JSON and NaN/Infinity are 400)
  → prune unknown fields (CRDs; ``fieldValidation=Strict`` turns them into a 400, otherwise a ``Warning``
  header) → default (CRD structural defaults; built-in defaulting) → admission (NamespaceLifecycle: 404 for a
  missing namespace, 403 for a terminating one; on pod CREATE the ServiceAccount and Priority plugins, see
  testcluster/admission.py) → PrepareForCreate/Update (status rules, server-owned
  metadata: uid, creationTimestamp, generation, resourceVersion) → validate (ObjectMeta, the kind's rules,
  OpenAPI schema + CEL for CRDs; 422 Invalid with field causes) → validating admission (ResourceQuota on pod
  CREATE: 403 ``exceeded quota``/``failed quota``, ``status.used`` kept current) → store;
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
plugins (LimitRanger, PodSecurity, ServiceAccount token mounting, quota scopes and object-count quotas...), server-side apply and managedFields,
protobuf/CBOR/YAML bodies, Table output, API priority and fairness, ``resourceVersionMatch`` on lists and
lists at an older resourceVersion, dry-run beyond skipping the write, the ``scale``/``eviction``/``exec``/
``attach``/``portforward`` subresources, multiple CRD versions and conversion webhooks, watch-cache slow
consumer termination, aggregated discovery (``application/json;g=apidiscovery.k8s.io``).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Callable

import aiohttp.web
import yaml

from .faults import Faults
from .resources import ResourceType
from .store import jcopy
from .core import Core
from .http import Http

log = logging.getLogger("testcluster.apiserver")
REPO = Path(__file__).resolve().parent.parent


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
