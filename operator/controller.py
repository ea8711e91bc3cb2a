"""The kopf side: watch the four kinds and the Jobs the operator owns, keep a cache, and reconcile each CR
through the pure ``plan`` (operator/plan.py). Thin on purpose.

Level-triggered: kopf's watch handlers only record objects and queue keys; workers reconcile a key from
the cache's current view, so any event order, duplicate or operator restart converges to the same
children (deterministic names, create-if-absent) and the same status. A CR whose upstream changes phase
is queued at once (no polling); retries wait with ``add_after``. kopf indices act as a start barrier:
kopf runs no handler before the initial listings of all watched kinds are complete, so a restarted
operator never acts on a partial view (e.g. creating attempt 1 before it has seen attempt 2).
No finalizers and no kopf annotations are put on the CRs: children are garbage-collected through their
ownerReferences, and the status is the only field the operator writes.

Watch gaps: after 410 Gone kopf relists, but a relist replays no DELETED events, so whatever was deleted
during the gap would stay in the cache for ever (a Job removed by its TTL "active", a deleted upstream
still "there"). A relist shows up as events of type None; each burst of them, and a slow periodic timer,
trigger a resync: the operator lists with its own client and drops what the list no longer has
(``WatchCache.stale_crs``/``stale_jobs``; objects newer than the list are kept, they came after it).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from typing import Any, Awaitable, Callable, Collection

import kopf

from ..api.common import GROUP, VERSION
from ..api.labels import KUEUE_JOB_UID, LABEL_JOB, LABEL_RUN, MANAGED_BY, MANAGED_BY_VALUE
from ..api.resources import KIND_INFO
from ..api.timefmt import parse_time
from .failures import ACTIVE, SUSPENDED, job_state
from .kube import ApiError, KubeClient
from .leadership import Leadership
from .metrics import OperatorMetrics
from .naming import owned_by, owner_uid_of
from .options import OperatorOptions
from .pods.run import Run
from .pods.staging import hf_secret_for
from .plan import (Observed, Plan, effective_rerun, finished_for_good, job_needing_pods, plan, recorded_result,
                   status_changed, target, upstream_view, wait_for_cleanup)
from .policy import effective_phase
from .progress_api import ProgressReceiver, latest_job, running_job
from .searchcontrol import reconcile_search, search_of
from .watch_cache import Key, WatchCache
from .workqueue import WorkQueue

log = logging.getLogger("branchmerge.operator")
OWNED = {MANAGED_BY: MANAGED_BY_VALUE}


class Operator:
    # A resync after a relist waits this long for the burst of relisted events to pass (one list per burst);
    # without any relist it still runs every RESYNC_PERIOD seconds (a missed 410, a relist that listed nothing).
    RESYNC_DELAY = 1.0
    RESYNC_PERIOD = 300.0

    def __init__(self, opts: OperatorOptions, connect: Callable[[], Awaitable[Any]], workers: int = 8,
                 error_backoff: float = 5.0, progress_listen: tuple[str, int] | None = None):
        self.opts = opts
        self.connect = connect
        self.workers = workers
        self.error_backoff = error_backoff
        self._resync_wanted: asyncio.Event | None = None
        self.cache = WatchCache()
        self.metrics = OperatorMetrics(lambda: list(self.cache.crs.values()))
        self.registry = kopf.OperatorRegistry()
        self.client = KubeClient(connect)
        # pods report progress here (address, port), never to the API server: only the operator writes status
        self.progress_listen = progress_listen
        # standalone until run_operator sets up peering: then the workers act only while this replica leads
        self.leadership = Leadership(self.client, None, "", 0, clusterwide=False)
        self.progress = ProgressReceiver(self.client, self.cache, self._enqueue,
                                         acting=lambda: self.leadership.leading.is_set())
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
        self._resync_wanted = asyncio.Event()
        self._tasks = [asyncio.create_task(self._work(), name=f"reconcile-{i}") for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="resync"))
        self._tasks.append(asyncio.create_task(self._resume_loop(), name="resume"))
        self._tasks.append(asyncio.create_task(self._requeue_loop(), name="requeue"))
        await self.leadership.start()
        if self.progress_listen:
            await self.progress.start(*self.progress_listen)

    async def _cleanup(self, **_: Any) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.leadership.stop()
        await self.progress.stop()
        if self.queue is not None:
            self.queue.close()
        await self.client.close()

    async def _resume_loop(self) -> None:
        """After a pause, look at every CR again (what happened meanwhile was another replica's doing)."""
        while True:
            await self.leadership.leading.wait()
            for key in list(self.cache.crs):
                self._enqueue(key)
            while self.leadership.leading.is_set():
                await asyncio.sleep(self.leadership.interval)

    async def _on_cr(self, event: dict, **_: Any) -> None:
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        if "name" not in meta or obj.get("kind") not in KIND_INFO:
            return
        key: Key = (meta.get("namespace", ""), obj["kind"], meta["name"])
        if event.get("type") is None:
            self._relisted()
        if event.get("type") == "DELETED":
            if not self.cache.drop_cr(*key, uid=meta.get("uid")):
                return  # a late event of a deleted CR whose namesake is already stored
            self._targets.pop(key, None)
            self.progress.forget(key)
            self.metrics.forget_cr(key[0], key[2])
            self._wake_downstreams(key, obj)
            return
        fresh, phase_changed = self.cache.put_cr(obj)
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
        if event.get("type") is None:
            self._relisted()
        key = self.cache.drop_job(obj) if event.get("type") == "DELETED" else self.cache.put_job(obj)
        if key is not None:
            self._enqueue(key)

    def _enqueue(self, key: Key) -> None:
        if self.queue is not None:
            self.queue.add(key)

    def _wake_downstreams(self, key: Key, obj: dict | None = None) -> None:
        for down in self.cache.downstreams(*key):
            self._enqueue(down)
        owner = search_of(obj or self.cache.crs.get(key))  # a MergeSearch's trial child: the search scores it
        if owner:
            self._enqueue((key[0], "MergeSearch", owner))

    # ---- resync: what a relist does not say ------------------------------------------------------------

    def _relisted(self) -> None:
        """kopf is (re)listing a resource: a watch started or restarted, maybe after a gap."""
        if self._resync_wanted is not None:
            self._resync_wanted.set()

    REQUEUE_PERIOD = 60.0

    async def _requeue_loop(self) -> None:
        """Look at every unfinished CR again every minute (as controller-runtime's SyncPeriod): decisions are
        level-triggered, so a wake-up lost to a fault (a killed operator between a write and its timer, a
        dropped event) costs at most this long instead of leaving a CR waiting for an event that never comes."""
        while True:
            await asyncio.sleep(self.REQUEUE_PERIOD)
            for key, cr in list(self.cache.crs.items()):
                if not finished_for_good(cr):
                    self._enqueue(key)

    async def _resync_loop(self) -> None:
        assert self._resync_wanted is not None
        while True:
            try:
                await asyncio.wait_for(self._resync_wanted.wait(), self.RESYNC_PERIOD)
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(self.RESYNC_DELAY)
            self._resync_wanted.clear()
            try:
                await self.resync()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the next relist or period tries again
                log.warning("resync failed: %s", err, exc_info=not isinstance(err, ApiError))

    async def resync(self) -> None:
        """List each kind in every namespace the cache holds and forget what was deleted unseen: a dropped
        Job queues its CR (a new attempt, or the recorded result), a dropped CR its downstreams. Objects the
        list shows newer than the cache are taken too (as a relist would)."""
        for namespace in sorted(self.cache.namespaces()):
            for kind in KIND_INFO:
                items, version = await self.client.list_at(kind, namespace)
                listed = {o["metadata"]["name"]: o for o in items}
                for gone in self.cache.stale_crs(namespace, kind, listed, version):
                    log.info("resync: %s %s/%s was deleted unseen", kind, namespace, gone["metadata"]["name"])
                    await self._on_cr({"type": "DELETED", "object": gone})
                for obj in items:
                    obj.setdefault("kind", kind)
                    obj.setdefault("apiVersion", f"{GROUP}/{VERSION}")
                    await self._on_cr({"type": "RESYNC", "object": obj})
            items, version = await self.client.list_at("Job", namespace, OWNED)
            listed = {o["metadata"]["name"]: o for o in items}
            for gone in self.cache.stale_jobs(namespace, listed, version):
                log.info("resync: Job %s/%s was deleted unseen", namespace, gone["metadata"]["name"])
                await self._on_job({"type": "DELETED", "object": gone})
            for obj in items:
                await self._on_job({"type": "RESYNC", "object": obj})

    async def _work(self) -> None:
        assert self.queue is not None
        while True:
            key = await self.queue.get()
            try:
                # Another replica is active: hold the key (timers and events still queue it) until this one
                # leads again; kopf's watches are paused meanwhile, so the cache may be stale.
                await self.leadership.leading.wait()
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
                       json.dumps(meta.get("labels") or {}, sort_keys=True), hf_secret_for(cr, self.opts),
                       effective_rerun(cr))
        cached = self._targets.get(key)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        want = target(cr, upstreams, self.opts)
        self._targets[key] = (fingerprint, want)
        return want

    async def _configmap(self, namespace: str, name: str, uid: str | None) -> dict | None:
        """The run's ConfigMap if it belongs to the CR with ``uid`` (a deleted namesake's is not ours)."""
        cached = self.cache.configmaps.get((namespace, name))
        if cached is not None and owned_by(cached, uid):
            return cached
        found = await self.client.get("ConfigMap", namespace, name)
        if found is None or not owned_by(found, uid):
            return None
        self.cache.configmaps[(namespace, name)] = found
        return found

    async def observe(self, cr: dict, key: Key, want: Any) -> Observed:
        """The children ``plan`` needs. The run's ConfigMap (its result record) is read only when it can
        matter: an attempt has finished, or the CR ran before but none of the run's Jobs is left."""
        uid = cr["metadata"].get("uid")
        observed = Observed(jobs=self.cache.jobs_of(key, uid))
        if not isinstance(want, Run):
            return observed
        job = job_needing_pods(want, observed.jobs)
        has_jobs = any((j["metadata"].get("labels") or {}).get(LABEL_RUN) == want.run_hash for j in observed.jobs)
        ran_before = bool((cr.get("status") or {}).get("attempts"))
        if job or (not has_jobs and ran_before):
            observed.configmap = await self._configmap(want.namespace, want.configmap_name, uid)
        await self._observe_starting(want, observed)
        if want.resources.get("queueName"):
            observed.workload = await self._workload(want, observed)
        if job and recorded_result(observed.configmap) is None:
            job_uid = next(j["metadata"].get("uid") for j in observed.jobs if j["metadata"]["name"] == job)
            # by the Job's uid too: pods of a deleted namesake's Job of the same name may still be there
            observed.pods[job] = [p for p in await self.client.list("Pod", want.namespace, {LABEL_JOB: job})
                                  if owned_by(p, job_uid)]
        return observed

    async def _workload(self, want: Run, observed: Observed) -> dict | None:
        """Kueue's Workload for the running attempt's Job (by the job-uid label Kueue sets, and ownership)."""
        job = latest_job(want.run_hash, observed.jobs)  # running, or suspended by Kueue
        if job is None or not job["metadata"].get("uid") or job_state(job) not in (ACTIVE, SUSPENDED):
            return None
        uid = job["metadata"]["uid"]
        try:
            found = await self.client.list("Workload", want.namespace, {KUEUE_JOB_UID: uid})
        except ApiError as err:
            if err.status == 404:  # Kueue is not installed
                return None
            raise
        return next((w for w in found if owned_by(w, uid)), None)

    async def _observe_starting(self, want: Run, observed: Observed) -> None:
        """While some pod of the running attempt is not ready: its pods, and the Events that say why they do
        not run (quota, admission, scheduling, image pull, mounts: operator/pending.py). Nothing once every
        pod runs: a gang with some pods ready and others unschedulable is still looked at (its running pods
        only wait in the rendezvous)."""
        name = running_job(want.run_hash, observed.jobs)
        latest = next((j for j in observed.jobs if j["metadata"]["name"] == name), None)
        if latest is None or (latest.get("spec") or {}).get("suspend"):
            return
        status = latest.get("status") or {}
        if int(status.get("ready") or 0) + int(status.get("succeeded") or 0) >= want.pods:
            return
        created = parse_time(latest["metadata"].get("creationTimestamp"))
        if created is not None and time.time() - created < self.opts.pending_recheck_seconds:
            return  # a Job just created is starting: the first look is the recheck plan() schedules
        job_uid = latest["metadata"].get("uid")
        pods = [p for p in await self.client.list("Pod", want.namespace, {LABEL_JOB: name}) if owned_by(p, job_uid)]
        observed.starting_pods = pods
        if not pods and job_uid:
            observed.job_events = await self.client.events_of(want.namespace, job_uid)
        for pod in pods:
            if (pod.get("status") or {}).get("phase") == "Pending" and pod["metadata"].get("uid"):
                observed.pod_events += await self.client.events_of(want.namespace, pod["metadata"]["uid"])

    async def reconcile(self, key: Key) -> None:
        cr = self.cache.crs.get(key)
        if cr is None or cr.get("metadata", {}).get("deletionTimestamp"):
            return
        namespace, kind, name = key
        self.metrics.reconciles.labels(kind).inc()
        if kind == "MergeSearch":  # no Job of its own: owned Merge and Eval children (operator/searchcontrol.py)
            await reconcile_search(self, key, cr)
            return
        if finished_for_good(cr):  # plan would keep the status as it is: skip resolving and reading children
            return
        upstreams = upstream_view(self.cache.upstreams_of(key))
        want = self._target(key, cr, upstreams)
        observed = await self.observe(cr, key, want)
        decided = plan(cr, upstreams, observed, self.opts, time.time(), want=want)
        if not self.leadership.leading.is_set():  # lost the lead while reading: write nothing
            self._enqueue(key)
            return
        if isinstance(want, Run):  # the running attempt's last progress report, as the pod sent it
            self.progress.apply(key, decided.status, running_job(want.run_hash, observed.jobs))

        for child_kind, child in decided.delete:
            await self.client.delete(child_kind, namespace, child)
        uid = cr["metadata"].get("uid")
        # A deleted namesake's Job still holds the name of the attempt to create: create nothing yet (its
        # Service and ConfigMap, of the same names as ours, are still there too).
        for obj in decided.create:
            old = self.cache.job_named(namespace, obj["metadata"]["name"]) if obj["kind"] == "Job" else None
            if old is not None and not owned_by(old, uid):
                decided = wait_for_cleanup(cr, "Job", obj["metadata"]["name"], owner_uid_of(old))
                break
        else:
            for obj in decided.create:
                created, fresh = await self.client.create(obj)
                if not fresh:  # 409: use it only once it is known to be ours
                    owner = await self._existing_owner(namespace, obj)
                    if owner is None:  # gone again, or not seen yet: look again shortly
                        if self.queue is not None:
                            self.queue.add_after(key, 1.0)
                        return
                    if owner != uid:
                        decided = wait_for_cleanup(cr, obj["kind"], obj["metadata"]["name"], owner)
                        break
                elif obj["kind"] == "Job":
                    self.cache.put_job(created)
                elif obj["kind"] == "ConfigMap":
                    self.cache.configmaps[(namespace, obj["metadata"]["name"])] = created
        await self._apply(key, cr, decided)

    async def _existing_owner(self, namespace: str, obj: dict) -> str | None:
        """The owner uid of the existing object a create met (409); None when that cannot be told yet.
        Read within the operator's RBAC: ConfigMaps by GET, Jobs from the watch-fed cache. Services cannot
        be read; one is named after its attempt's Job and made in the same reconcile, so a Service whose
        Job is not a namesake's (checked before any create) counts as this CR's."""
        name, cr_uid = obj["metadata"]["name"], owner_uid_of(obj)
        if obj["kind"] == "ConfigMap":
            found = await self.client.get("ConfigMap", namespace, name)
            if found is not None and owned_by(found, cr_uid):
                self.cache.configmaps[(namespace, name)] = found
            return None if found is None else owner_uid_of(found) or cr_uid
        if obj["kind"] == "Job":
            found = self.cache.job_named(namespace, name)
            return None if found is None else owner_uid_of(found) or cr_uid
        return cr_uid

    async def _apply(self, key: Key, cr: dict, decided: Plan) -> None:
        """Child patches, then the status, Events, metrics and the next look of a plan."""
        namespace, kind, name = key
        for child_kind, child, patch in decided.patch:
            patched = await self.client.patch(child_kind, namespace, child, patch)
            if patched is not None and child_kind == "Job":
                self.cache.put_job(patched)
            elif patched is not None and child_kind == "ConfigMap":
                self.cache.configmaps[(namespace, child)] = patched

        old = cr.get("status") or {}
        changes = status_changed(old, decided.status)
        if changes:
            patched = await self.client.patch(kind, namespace, name, {"status": changes}, sub="status")
            if patched is None:  # deleted meanwhile
                return
            self.cache.put_cr(patched)  # write-through: the next reconcile must not repeat this transition
            if _generation(patched) != _generation(cr):
                # The spec changed while this reconcile ran. Its watch event is now older than the stored
                # answer and will be dropped as stale, so queue the key here or the edit would go unseen.
                self._enqueue(key)
            self.metrics.observe_cr(patched)
            if effective_phase(old) != effective_phase(decided.status):
                self._wake_downstreams(key)
        for event in decided.events:
            await self.client.event(cr, event.type, event.reason, event.message)
        if decided.finished:
            start, end = parse_time(decided.status.get("startTime")), parse_time(decided.status.get("completionTime"))
            if start is not None and end is not None:
                self.metrics.stage_duration.labels(kind, decided.finished).observe(max(end - start, 0.0))
            self.metrics.observe_cost(kind, decided.status.get("cost"))  # once: the plan that records the result
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
    # one identity for kopf's peering and the operator's own leadership check (kopf's form: pod, then start)
    identity = f"{os.environ.get('POD_ID') or socket.gethostname()}/{uuid.uuid4().hex[:12]}"
    op.leadership = Leadership(op.client, peering, identity, priority, clusterwide=clusterwide, namespaces=namespaces)
    await kopf.operator(
        registry=op.registry, settings=settings(peering, clusterwide, priority),
        clusterwide=clusterwide, namespaces=list(namespaces), standalone=peering is None,
        peering_name=peering, priority=priority, liveness_endpoint=liveness, identity=identity,
        stop_flag=stop_flag, ready_flag=ready_flag)


def _generation(obj: dict):
    return (obj.get("metadata") or {}).get("generation")
