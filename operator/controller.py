"""The kopf side: watch the four kinds and the Jobs the operator owns, keep a store, and reconcile each CR
through the pure ``plan`` (operator/plan.py). Thin on purpose.

Level-triggered: kopf's watch handlers only record objects and queue keys; workers reconcile a key from
the store's current view, so any event order, duplicate or operator restart converges to the same
children (deterministic names, create-if-absent) and the same status. A CR whose upstream changes phase
is queued at once (no polling); retries wait with ``add_after``. kopf indices act as a start barrier:
kopf runs no handler before the initial listings of all watched kinds are complete, so a restarted
operator never acts on a partial view (e.g. creating attempt 1 before it has seen attempt 2).
No finalizers and no kopf annotations are put on the CRs: children are garbage-collected through their
ownerReferences, and the status is the only field the operator writes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable, Collection

import kopf

from ..api.common import GROUP, VERSION
from ..api.resources import KIND_INFO
from .builders import Run, hf_secret_for
from .kube import ApiError, KubeClient
from .metrics import OperatorMetrics
from .naming import LABEL_JOB, LABEL_RUN, MANAGED_BY, MANAGED_BY_VALUE
from .options import OperatorOptions
from .plan import (Observed, job_needing_pods, parse_time, plan, recorded_result, status_changed, target,
                   upstream_view)
from .progress_api import ProgressReceiver, running_job
from .store import Key, Store
from .workqueue import WorkQueue

log = logging.getLogger("branchmerge.operator")
OWNED = {MANAGED_BY: MANAGED_BY_VALUE}


class Operator:
    def __init__(self, opts: OperatorOptions, connect: Callable[[], Awaitable[Any]], workers: int = 8,
                 error_backoff: float = 5.0, progress_listen: tuple[str, int] | None = None):
        self.opts = opts
        self.connect = connect
        self.workers = workers
        self.error_backoff = error_backoff
        self.store = Store()
        self.metrics = OperatorMetrics(lambda: list(self.store.crs.values()))
        self.registry = kopf.OperatorRegistry()
        self.client = KubeClient(connect)
        # pods report progress here (address, port), never to the API server: only the operator writes status
        self.progress = ProgressReceiver(self.client, self.store, self._enqueue)
        self.progress_listen = progress_listen
        self.queue: WorkQueue | None = None
        self._targets: dict[Key, tuple[tuple, Any]] = {}
        self._tasks: list[asyncio.Task] = []
        self._register()

    # ---- kopf wiring --------------------------------------------------------------------------------

    def _register(self) -> None:
        r = self.registry
        for kind, info in KIND_INFO.items():
            kopf.index(GROUP, VERSION, info.plural, id=f"barrier_{info.plural}", registry=r)(_no_index)
            kopf.on.event(GROUP, VERSION, info.plural, id=f"watch_{info.plural}", registry=r)(self._on_cr)
        # ``labels=`` is only kopf's client-side filter; the API server filters the Jobs' list/watch through
        # settings().watching.label_selectors. Both are kept: the filter costs nothing.
        kopf.index("batch", "v1", "jobs", id="barrier_jobs", labels=OWNED, registry=r)(_no_index)
        kopf.on.event("batch", "v1", "jobs", id="watch_jobs", labels=OWNED, registry=r)(self._on_job)
        kopf.on.startup(id="start_workers", registry=r)(self._startup)
        kopf.on.cleanup(id="stop_workers", registry=r)(self._cleanup)
        kopf.on.login(id="login", registry=r)(self._login)
        kopf.on.probe(id="queue_depth", registry=r)(self._probe)

    async def _probe(self, **_: Any) -> int:
        return len(self.queue or ())

    async def _login(self, **_: Any) -> Any:
        return await self.connect()

    async def _startup(self, **_: Any) -> None:
        self.queue = WorkQueue()
        self._tasks = [asyncio.create_task(self._work(), name=f"reconcile-{i}") for i in range(self.workers)]
        if self.progress_listen:
            await self.progress.start(*self.progress_listen)

    async def _cleanup(self, **_: Any) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.progress.stop()
        if self.queue is not None:
            self.queue.close()
        await self.client.close()

    async def _on_cr(self, event: dict, **_: Any) -> None:
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        if "name" not in meta or obj.get("kind") not in KIND_INFO:
            return
        key: Key = (meta.get("namespace", ""), obj["kind"], meta["name"])
        if event.get("type") == "DELETED":
            self.store.drop_cr(*key)
            self._targets.pop(key, None)
            self.progress.forget(key)
            self.metrics.forget_cr(key[0], key[2])
            self._wake_downstreams(key)
            return
        fresh, phase_changed = self.store.put_cr(obj)
        if not fresh:  # the echo of our own status write (already stored) or a stale event
            return
        self.metrics.observe_cr(obj)
        self._enqueue(key)
        if phase_changed:
            self._wake_downstreams(key)

    async def _on_job(self, event: dict, **_: Any) -> None:
        obj = event.get("object") or {}
        if not (obj.get("metadata") or {}).get("name"):
            return
        key = self.store.drop_job(obj) if event.get("type") == "DELETED" else self.store.put_job(obj)
        if key is not None:
            self._enqueue(key)

    def _enqueue(self, key: Key) -> None:
        if self.queue is not None:
            self.queue.add(key)

    def _wake_downstreams(self, key: Key) -> None:
        for down in self.store.downstreams(*key):
            self._enqueue(down)

    async def _work(self) -> None:
        assert self.queue is not None
        while True:
            key = await self.queue.get()
            try:
                await self.reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self.metrics.reconcile_errors.labels(key[1]).inc()
                log.warning("reconcile %s/%s/%s failed: %s", *key, err, exc_info=not isinstance(err, ApiError))
                self.queue.add_after(key, self.error_backoff)
            finally:
                self.queue.done(key)

    # ---- one reconcile --------------------------------------------------------------------------------

    def _target(self, key: Key, cr: dict, upstreams: dict[str, dict]) -> Any:
        """``target()`` memoised on what it depends on (parsing and hashing a spec is the costly part of a
        reconcile, and most reconciles see the same spec again)."""
        meta = cr["metadata"]
        fingerprint = (meta.get("uid"), meta.get("generation"), json.dumps(upstreams, sort_keys=True),
                       json.dumps(meta.get("labels") or {}, sort_keys=True), hf_secret_for(cr, self.opts))
        cached = self._targets.get(key)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        want = target(cr, upstreams, self.opts)
        self._targets[key] = (fingerprint, want)
        return want

    async def _configmap(self, namespace: str, name: str) -> dict | None:
        cached = self.store.configmaps.get((namespace, name))
        if cached is not None:
            return cached
        found = await self.client.get("ConfigMap", namespace, name)
        if found is not None:
            self.store.configmaps[(namespace, name)] = found
        return found

    async def observe(self, cr: dict, key: Key, want: Any) -> Observed:
        """The children ``plan`` needs. The run's ConfigMap (its result record) is read only when it can
        matter: an attempt has finished, or the CR ran before but none of the run's Jobs is left."""
        observed = Observed(jobs=self.store.jobs_of(key))
        if not isinstance(want, Run):
            return observed
        job = job_needing_pods(want, observed.jobs)
        has_jobs = any((j["metadata"].get("labels") or {}).get(LABEL_RUN) == want.run_hash for j in observed.jobs)
        ran_before = bool((cr.get("status") or {}).get("attempts"))
        if job or (not has_jobs and ran_before):
            observed.configmap = await self._configmap(want.namespace, want.configmap_name)
        if job and recorded_result(observed.configmap) is None:
            observed.pods[job] = await self.client.list("Pod", want.namespace, {LABEL_JOB: job})
        return observed

    async def reconcile(self, key: Key) -> None:
        cr = self.store.crs.get(key)
        if cr is None or cr.get("metadata", {}).get("deletionTimestamp"):
            return
        namespace, kind, name = key
        self.metrics.reconciles.labels(kind).inc()
        upstreams = upstream_view(self.store.upstreams_of(key))
        want = self._target(key, cr, upstreams)
        observed = await self.observe(cr, key, want)
        decided = plan(cr, upstreams, observed, self.opts, time.time(), want=want)
        if isinstance(want, Run):  # the running attempt's last progress report, as the pod sent it
            self.progress.apply(key, decided.status, running_job(want.run_hash, observed.jobs))

        for child_kind, child in decided.delete:
            await self.client.delete(child_kind, namespace, child)
        for obj in decided.create:
            created, _ = await self.client.create(obj)
            if created is not None and obj["kind"] == "Job":
                self.store.put_job(created)
            elif created is not None and obj["kind"] == "ConfigMap":
                self.store.configmaps[(namespace, obj["metadata"]["name"])] = created
        for child_kind, child, patch in decided.patch:
            patched = await self.client.patch(child_kind, namespace, child, patch)
            if patched is not None and child_kind == "Job":
                self.store.put_job(patched)
            elif patched is not None and child_kind == "ConfigMap":
                self.store.configmaps[(namespace, child)] = patched

        old = cr.get("status") or {}
        changes = status_changed(old, decided.status)
        if changes:
            patched = await self.client.patch(kind, namespace, name, {"status": changes}, sub="status")
            if patched is None:  # deleted meanwhile
                return
            self.store.put_cr(patched)  # write-through: the next reconcile must not repeat this transition
            if _generation(patched) != _generation(cr):
                # The spec changed while this reconcile ran. Its watch event is now older than the stored
                # answer and will be dropped as stale, so queue the key here or the edit would go unseen.
                self._enqueue(key)
            self.metrics.observe_cr(patched)
            if old.get("phase") != decided.status.get("phase"):
                self._wake_downstreams(key)
        for event in decided.events:
            await self.client.event(cr, event.type, event.reason, event.message)
        if decided.finished:
            start, end = parse_time(decided.status.get("startTime")), parse_time(decided.status.get("completionTime"))
            if start is not None and end is not None:
                self.metrics.stage_duration.labels(kind, decided.finished).observe(max(end - start, 0.0))
        if decided.retried:
            self.metrics.retries.labels(kind, decided.retried).inc()
        if decided.requeue_after is not None and self.queue is not None:
            self.queue.add_after(key, decided.requeue_after)


async def _no_index(**_: Any) -> None:
    """Indexes nothing: its presence makes kopf hold all handlers until the initial listings are done."""
    return None


class _NoDiffBase(kopf.DiffBaseStorage):
    """The operator registers no change-detecting handlers (on.create/update/resume), so kopf's per-event
    snapshot of each body is pure overhead (a deep copy per event); this also means kopf never writes its
    last-handled-configuration annotation onto the CRs."""

    def build(self, *, body, extra_fields=None):  # type: ignore[override]
        return {}

    def fetch(self, *, body):  # type: ignore[override]
        return None

    def store(self, *, body, patch, essence) -> None:  # type: ignore[override]
        return None


class _NoProgress(kopf.ProgressStorage):
    """No state-storing handlers either: nothing to persist, nothing to strip from snapshots."""

    def fetch(self, *, key, body):  # type: ignore[override]
        return None

    def store(self, *, key, record, body, patch) -> None:  # type: ignore[override]
        return None

    def purge(self, *, key, body, patch) -> None:  # type: ignore[override]
        return None

    def touch(self, *, body, patch, value) -> None:  # type: ignore[override]
        return None

    def clear(self, *, essence):  # type: ignore[override]
        return essence


def settings(peering: str | None, clusterwide: bool, priority: int = 0) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    s.persistence.diffbase_storage = _NoDiffBase()
    s.persistence.progress_storage = _NoProgress()
    s.posting.level = logging.WARNING  # our own Events tell the story; kopf posts only its problems
    s.scanning.disabled = True  # CRDs are installed before the operator: no CRD/namespace watching (RBAC)
    # Server-side selection of the Jobs: a cluster-wide operator would otherwise list and watch every Job of
    # the cluster (kopf's ``labels=`` filter drops them only after they crossed the wire and were parsed).
    # kopf (1.45) sends these as ``labelSelector`` on the list and watch requests of the matching resource.
    s.watching.label_selectors["batch", "v1", "jobs"] = f"{MANAGED_BY}={MANAGED_BY_VALUE}"
    s.watching.server_timeout = 300
    s.watching.client_timeout = 330
    s.networking.request_timeout = 60
    if peering:
        s.peering.name = peering
        s.peering.clusterwide = clusterwide
        s.peering.priority = priority
        s.peering.mandatory = True
        s.peering.standalone = False
    else:
        s.peering.standalone = True
    return s


async def run_operator(op: Operator, *, namespaces: Collection[str] = (), clusterwide: bool = False,
                       peering: str | None = None, priority: int = 0, liveness: str | None = None,
                       stop_flag: Any = None, ready_flag: Any = None) -> None:
    await kopf.operator(
        registry=op.registry, settings=settings(peering, clusterwide, priority),
        clusterwide=clusterwide, namespaces=list(namespaces), standalone=peering is None,
        peering_name=peering, priority=priority, liveness_endpoint=liveness,
        stop_flag=stop_flag, ready_flag=ready_flag)


def _generation(obj: dict):
    return (obj.get("metadata") or {}).get("generation")
