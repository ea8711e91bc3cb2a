"""The Job controller stand-in (kube-controller-manager's ``job-controller``), talking to the API server
only over HTTP through ``testcluster.client``.

``JobController`` keeps informers on Jobs and pods, and for each Job runs ``jobpolicy.decide`` (the pure
syncJob) on the cached Job and the pods it controls, then carries the decision out the way the real one
does: deletions (un-tracking first for pods that must not be counted), creations in slow-start batches
(1, 2, 4, … stopping at the first failing batch), the status written with PUT ``jobs/<name>/status``
(resourceVersion-checked: a stale cache gets 409 and a retry), then the ``job-tracking`` finalizers
removed, then the status with the counters. It is level-triggered and restart-safe like the real one:
- "expectations": while pods it created or deleted are not yet seen through the watch it creates no
  pods (creations counted, deletions and finalizer removals tracked by pod UID, 5 min timeout);
- finished pods are counted through ``uncountedTerminatedPods`` before their finalizer goes, so a
  crash between the two loses nothing and counts nothing twice;
- it reads its own status writes (a Job cached at a version it has already replaced is swapped for the
  version it wrote), so a lagging watch cannot make it undo counts;
- a restarted controller lists everything afresh; duplicate pods of one index are deleted.
Pod events sync the Job after a batching delay (real: 1 s), Job spec changes at once; failures back
off per Job (real: 1 s doubling to 60 s). Pods whose Job is gone or finished, or that lost their owner
reference, get their tracking finalizer removed (the real orphan worker).

The ttl-after-finished controller is ``testcluster.ttl.TTLController``.

Events (testcluster.events, source ``job-controller``), as the real controller records them:
``SuccessfulCreate`` "Created pod: <name>", ``FailedCreate`` "Error creating: <the API error>" (e.g. a pod
refused by ResourceQuota admission: the Job gets no condition, its sync fails and is retried with the
per-Job back-off above, as the real one does, so the quota problem shows only in these Events),
``SuccessfulDelete``/``FailedDelete``, ``Completed`` "Job completed", the Failed condition's reason and
message (BackoffLimitExceeded, DeadlineExceeded, PodFailurePolicy...), ``Suspended``/``Resumed``.

Not emulated: metrics, leader election, adoption of orphan pods by label selector (pods are
matched by controller owner reference), client-side rate limiting, and what ``jobpolicy`` lists.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

from .client import ApiError, Client, Informer
from .events import NORMAL, WARNING, EventRecorder
from .jobapi import (JOB_TRACKING_FINALIZER, BackoffRecord, controller_ref, controller_uid, has_tracking_finalizer,
                     is_finished, job_spec, parse_time, pod_name, pod_uid)
from .jobpolicy import decide, same_status

log = logging.getLogger("testcluster.jobcontroller")

EXPECTATIONS_TIMEOUT = 300.0  # the real ExpectationsTimeout
Key = tuple[str, str]


def key_of(obj: dict) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name", "")


class WorkQueue:
    """client-go's delaying work queue, reduced: a key is queued at most once (at its earliest due time)
    and never handed to two workers at once; a key re-added while in process waits until it is done.

    Waiting uses a plain Event woken by timers: ``asyncio.wait_for`` in Python 3.11 can swallow a
    cancellation that races with its inner wait, which would make a worker unstoppable."""

    def __init__(self) -> None:
        self._due: dict = {}
        self._processing: set = set()
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def add_after(self, key, delay: float = 0.0) -> None:
        due = asyncio.get_running_loop().time() + max(0.0, delay)
        current = self._due.get(key)
        if current is None or due < current:
            self._due[key] = due
            self._wake.set()

    def __len__(self) -> int:
        return len(self._due)

    async def get(self):
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            best, best_due = None, None
            for key, due in self._due.items():
                if key not in self._processing and (best_due is None or due < best_due):
                    best, best_due = key, due
            if best is not None and best_due <= now:
                del self._due[best]
                self._processing.add(best)
                return best
            self._wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if best_due is not None:
                self._timer = loop.call_at(best_due, self._wake.set)
            await self._wake.wait()

    def done(self, key) -> None:
        self._processing.discard(key)
        self._wake.set()


@dataclasses.dataclass
class Expectations:
    """What this controller did to one Job's pods that its cache has not shown yet."""
    uid: str
    creations: int = 0
    deletions: set[str] = dataclasses.field(default_factory=set)
    removals: set[str] = dataclasses.field(default_factory=set)
    stamp: float = dataclasses.field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.stamp = time.monotonic()

    def satisfied(self) -> bool:
        if self.creations <= 0 and not self.deletions:
            return True
        return time.monotonic() - self.stamp > EXPECTATIONS_TIMEOUT

    def observe(self, pod: dict, gone: bool = False) -> None:
        uid = pod_uid(pod)
        if gone or (pod.get("metadata") or {}).get("deletionTimestamp"):
            self.deletions.discard(uid)
        if gone or not has_tracking_finalizer(pod):
            self.removals.discard(uid)


class Component:
    """An asyncio component that can also run in a thread of its own with its own event loop."""

    thread_name = "testcluster"

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self.ready = threading.Event()  # set once the informers have synced (or the component ended)
        self.error: BaseException | None = None

    async def run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def start(self, timeout: float = 30.0):
        """Run in a daemon thread; return once the informers have synced."""
        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._task = loop.create_task(self.run())
            try:
                loop.run_until_complete(self._task)
            except asyncio.CancelledError:
                pass
            except BaseException as err:  # noqa: BLE001 - kept for the caller
                self.error = err
                log.exception("%s stopped", self.thread_name)
            finally:
                self.ready.set()
                loop.close()

        self._thread = threading.Thread(target=main, name=self.thread_name, daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout):
            raise RuntimeError(f"{self.thread_name} did not sync within {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"{self.thread_name} failed to start") from self.error
        return self

    def stop(self, timeout: float = 20.0) -> None:
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:
                pass  # the loop already ended
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def cancel_all(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class JobController(Component):
    thread_name = "job-controller"

    def __init__(self, url: str, *, backoff_base: float = 10.0, backoff_max: float = 360.0,
                 batch_period: float = 1.0, api_backoff: tuple[float, float] = (1.0, 60.0), workers: int = 5,
                 namespace: str | None = None, pod_label_selector: str | None = None, stop_grace: float = 10.0,
                 user_agent: str = "kube-controller-manager/v1.33.0 (testcluster) job-controller"):
        super().__init__()
        self.stop_grace = stop_grace
        self.url = url
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.batch_period = batch_period
        self.api_backoff = api_backoff
        self.workers = workers
        self.namespace = namespace
        self.pod_label_selector = pod_label_selector
        self.user_agent = user_agent
        self.client: Client | None = None
        self.jobs: Informer | None = None
        self.pods: Informer | None = None
        self.queue: WorkQueue | None = None
        self.orphans: WorkQueue | None = None
        self.syncs = 0  # how many syncs ran (tests, soak reports)
        self._expect: dict[Key, Expectations] = {}
        self._backoff: dict[str, BackoffRecord] = {}  # by Job uid, in memory like the real backoffStore
        self._written: dict[str, tuple[set[str], dict]] = {}  # by Job uid: replaced versions, our version
        self._seen: dict[Key, tuple[str, int, object]] = {}  # Job uid, generation, activeDeadlineSeconds
        self._failures: dict[Key, int] = {}
        self._inflight: set[asyncio.Task] = set()

    # ---- lifecycle --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled."""
        self.client = Client(self.url, user_agent=self.user_agent)
        self.recorder = EventRecorder(self.client, "job-controller")
        self.queue, self.orphans = WorkQueue(), WorkQueue()
        self.jobs = Informer(self.client, "batch/v1", "jobs", self.namespace, on_event=self._on_job)
        self.pods = Informer(self.client, "v1", "pods", self.namespace, label_selector=self.pod_label_selector,
                             on_event=self._on_pod)
        tasks = [asyncio.create_task(self.jobs.run()), asyncio.create_task(self.pods.run())]
        try:
            await asyncio.gather(self.jobs.synced(), self.pods.synced())
            tasks += [asyncio.create_task(self._worker()) for _ in range(self.workers)]
            tasks.append(asyncio.create_task(self._orphan_worker()))
            self.ready.set()
            await asyncio.gather(*tasks)
        finally:
            await cancel_all(tasks)
            if self._inflight:
                log.debug("stopping: waiting for %d sync(s) in flight", len(self._inflight))
                await asyncio.wait(set(self._inflight), timeout=self.stop_grace)
            await cancel_all(list(self._inflight))
            await self.recorder.close()
            await self.client.close()

    # ---- events -----------------------------------------------------------------------------------------

    async def _on_job(self, type_: str, job: dict) -> None:
        key = key_of(job)
        meta = job.get("metadata") or {}
        if type_ == "DELETED":
            self._seen.pop(key, None)
            self._written.pop(meta.get("uid", ""), None)
            self._backoff.pop(meta.get("uid", ""), None)
            self.queue.add_after(key)
            self._orphan_pods_of(meta.get("uid"))
            return
        seen = (meta.get("uid"), meta.get("generation"), (job.get("spec") or {}).get("activeDeadlineSeconds"))
        before = self._seen.get(key)
        self._seen[key] = seen
        # A new Job or a spec change syncs at once; status-only changes are batched.
        self.queue.add_after(key, 0.0 if before is None or before[:2] != seen[:2] else self.batch_period)
        if is_finished(job):
            self._orphan_pods_of(meta.get("uid"))
        elif before is not None and before[2] != seen[2] and seen[2] is not None:
            start = (job.get("status") or {}).get("startTime")
            if start:  # the deadline moved: sync when it passes
                self.queue.add_after(key, float(seen[2]) - (time.time() - (parse_time(start) or time.time())))

    async def _on_pod(self, type_: str, pod: dict) -> None:
        ns = (pod.get("metadata") or {}).get("namespace") or ""
        uid = controller_uid(pod)
        job = self._job_by_uid(ns, controller_ref(pod), uid) if uid else None
        if job is None or is_finished(job):
            if type_ != "DELETED" and has_tracking_finalizer(pod):
                self.orphans.add_after(key_of(pod))
            return
        key = key_of(job)
        exp = self._expect.get(key)
        if exp is not None and exp.uid == uid:
            if type_ == "ADDED":
                exp.creations -= 1
            exp.observe(pod, gone=type_ == "DELETED")
        self.queue.add_after(key, self.batch_period)

    def _job_by_uid(self, ns: str, ref: dict | None, uid: str) -> dict | None:
        job = self.jobs.cache.get((ns, (ref or {}).get("name", "")))
        if job is not None and (job.get("metadata") or {}).get("uid") == uid:
            return job
        return None

    def _orphan_pods_of(self, job_uid: str | None) -> None:
        for key, pod in list(self.pods.cache.items()):
            if controller_uid(pod) == job_uid and has_tracking_finalizer(pod):
                self.orphans.add_after(key)

    # ---- workers ----------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            # A sync runs as its own task, so that stopping lets it finish: a controller stopped between
            # sending a create and seeing its answer would leave a pod its successor cannot know of.
            sync = asyncio.create_task(self._sync(key))
            self._inflight.add(sync)
            sync.add_done_callback(self._inflight.discard)
            sync.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
            try:
                await asyncio.shield(sync)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except ApiError as err:
                if err.status == 409:  # a stale cache: the newer version's event is on its way
                    log.debug("job %s/%s: conflict, retrying", *key)
                    self.queue.add_after(key, self.batch_period)
                else:
                    self._retry_later(key, err)
            except Exception as err:  # noqa: BLE001 - one Job's trouble must not stop the others
                self._retry_later(key, err)
            finally:
                self.queue.done(key)

    def _retry_later(self, key: Key, err: BaseException) -> None:
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        delay = min(self.api_backoff[0] * 2 ** (n - 1), self.api_backoff[1])
        log.warning("job %s/%s: sync failed (%s); retrying in %.1fs", key[0], key[1], err, delay)
        self.queue.add_after(key, delay)

    async def _orphan_worker(self) -> None:
        while True:
            key = await self.orphans.get()
            try:
                await self._sync_orphan(key)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                log.warning("pod %s/%s: finalizer cleanup failed (%s)", key[0], key[1], err)
                self.orphans.add_after(key, self.api_backoff[0])
            finally:
                self.orphans.done(key)

    async def _sync_orphan(self, key: Key) -> None:
        """Remove the tracking finalizer of a pod no unfinished Job of ours controls any more."""
        pod = self.pods.cache.get(key)
        if pod is None or not has_tracking_finalizer(pod):
            return
        ref = controller_ref(pod)
        if ref is not None:
            if ref.get("kind") != "Job" or ref.get("apiVersion") != "batch/v1":
                return  # controlled by something else: not ours to touch
            job = await self.client.get("batch/v1", "jobs", key[0], ref.get("name", ""))
            if job is not None and (job.get("metadata") or {}).get("uid") == ref.get("uid"):
                if job_spec(job).managed_by not in (None, "kubernetes.io/job-controller"):
                    return
                if not is_finished(job):
                    return  # still running: its sync handles the finalizer
        await self._untrack(pod)

    # ---- one sync ---------------------------------------------------------------------------------------

    def _effective_job(self, key: Key) -> dict | None:
        cached = self.jobs.cache.get(key)
        if cached is None:
            return None
        uid = cached["metadata"].get("uid", "")
        mine = self._written.get(uid)
        if mine is not None:
            replaced, written = mine
            if cached["metadata"].get("resourceVersion") in replaced:
                return written  # the watch lags behind our own write
            del self._written[uid]
        return cached

    async def _sync(self, key: Key) -> None:
        self.syncs += 1
        job = self._effective_job(key)
        if job is None:
            exp = self._expect.pop(key, None)
            if exp is not None:
                self._backoff.pop(exp.uid, None)
                self._written.pop(exp.uid, None)
            return
        uid = job["metadata"].get("uid", "")
        if is_finished(job):
            self._backoff.pop(uid, None)
            self._expect.pop(key, None)
            self._orphan_pods_of(uid)
            return
        exp = self._expect.get(key)
        if exp is None or exp.uid != uid:
            exp = self._expect[key] = Expectations(uid)
        pods = [p for (ns, _), p in self.pods.cache.items() if ns == key[0] and controller_uid(p) == uid]
        for pod in pods:
            exp.observe(pod)
        live = {pod_uid(p) for p in pods}
        exp.deletions &= live  # gone from the cache: deleted
        exp.removals &= live
        decision = decide(job, pods, time.time(), backoff=self._backoff.get(uid), expected_rm_finalizers=exp.removals,
                          satisfied_expectations=exp.satisfied(), backoff_base=self.backoff_base,
                          backoff_max=self.backoff_max)
        if decision.skipped:
            return
        by_name = {pod_name(p): p for p in pods}

        doomed = [by_name[n] for n in decision.discard + decision.delete]
        if doomed:
            exp.deletions.update(pod_uid(p) for p in doomed)
            exp.touch()
            results = await asyncio.gather(*(self._discard(by_name[n]) for n in decision.discard),
                                           *(self._delete(by_name[n]) for n in decision.delete),
                                           return_exceptions=True)
            for pod, result in zip(doomed, results):
                if isinstance(result, BaseException):
                    exp.deletions.discard(pod_uid(pod))
            _raise_first(results)
        if decision.create:
            await self._create_pods(job, exp, decision.create)

        if not same_status(job.get("status"), decision.interim_status):
            job = await self._write_status(job, decision.interim_status)
            # The new failures are recorded in the status now: count them in the backoff once.
            self._backoff[uid] = decision.backoff
        if decision.remove_finalizers:
            pods_out = [by_name[n] for n in decision.remove_finalizers]
            exp.removals.update(pod_uid(p) for p in pods_out)
            results = await asyncio.gather(*(self._untrack(p) for p in pods_out), return_exceptions=True)
            for pod, result in zip(pods_out, results):
                if isinstance(result, BaseException):
                    exp.removals.discard(pod_uid(pod))
            # Some finalizers stayed: the next sync counts from what the pods show.
            _raise_first(results)
        if not same_status(job.get("status"), decision.status):
            before = job.get("status")
            await self._write_status(job, decision.status)
            self._condition_events(job, before, decision.status)
        self._backoff[uid] = decision.backoff
        if decision.requeue_after is not None:
            self.queue.add_after(key, max(decision.requeue_after, self.batch_period))

    def _condition_events(self, job: dict, old: dict | None, new: dict | None) -> None:
        """The Events the real controller records with a Job's conditions."""
        def true(status, type_):
            return next((c for c in (status or {}).get("conditions") or []
                         if c.get("type") == type_ and c.get("status") == "True"), None)
        if true(new, "Complete") and not true(old, "Complete"):
            self.recorder.event(job, NORMAL, "Completed", "Job completed")
        failed = true(new, "Failed")
        if failed and not true(old, "Failed"):
            self.recorder.event(job, WARNING, failed.get("reason") or "Failed", failed.get("message") or "")
        if true(new, "Suspended") and not true(old, "Suspended"):
            self.recorder.event(job, NORMAL, "Suspended", "Job suspended")
        elif true(old, "Suspended") and not true(new, "Suspended"):
            self.recorder.event(job, NORMAL, "Resumed", "Job resumed")

    async def _write_status(self, job: dict, status: dict) -> dict:
        meta = job["metadata"]
        body = {**job, "status": status}
        written = await self.client.replace("batch/v1", "jobs", meta.get("namespace"), meta["name"], body,
                                            sub="status")
        replaced, _ = self._written.get(meta.get("uid", ""), (set(), None))
        replaced.add(meta.get("resourceVersion"))
        self._written[meta.get("uid", "")] = (replaced, written)
        return written

    async def _create_pods(self, job: dict, exp: Expectations, bodies: list[dict]) -> None:
        """Slow start: batches of 1, 2, 4, …; after a failing batch the rest is not attempted."""
        ns = job["metadata"].get("namespace")
        exp.creations += len(bodies)
        exp.touch()
        pending, size = list(bodies), 1
        while pending:
            chunk, pending = pending[:size], pending[size:]
            results = await asyncio.gather(*(self.client.create("v1", "pods", ns, b) for b in chunk),
                                           return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            for result in results:  # what the real pod control records for each creation
                if not isinstance(result, BaseException):
                    self.recorder.event(job, NORMAL, "SuccessfulCreate", f"Created pod: {pod_name(result)}")
                elif not _namespace_terminating(result):
                    self.recorder.event(job, WARNING, "FailedCreate", f"Error creating: {_error_text(result)}")
            exp.creations -= len(errors)
            if errors:
                exp.creations -= len(pending)
                if all(_namespace_terminating(e) for e in errors):
                    return
                raise errors[0]
            for created in results:
                log.debug("job %s/%s: created pod %s", ns, job["metadata"]["name"], pod_name(created))
            size *= 2

    async def _delete(self, pod: dict) -> None:
        meta = pod["metadata"]
        job = self._owner(pod)
        try:
            await self.client.delete("v1", "pods", meta.get("namespace"), meta["name"])  # None on 404 is fine
        except Exception as err:
            if job is not None:
                self.recorder.event(job, WARNING, "FailedDelete", f"Error deleting: {_error_text(err)}")
            raise
        if job is not None:
            self.recorder.event(job, NORMAL, "SuccessfulDelete", f"Deleted pod: {meta['name']}")

    def _owner(self, pod: dict) -> dict | None:
        ns = (pod.get("metadata") or {}).get("namespace") or ""
        uid = controller_uid(pod)
        return self._job_by_uid(ns, controller_ref(pod), uid) if uid else None

    async def _discard(self, pod: dict) -> None:
        await self._untrack(pod)
        await self._delete(pod)

    async def _untrack(self, pod: dict, attempts: int = 5) -> None:
        """Remove the tracking finalizer with a JSON patch guarded by a test of that list entry."""
        meta = pod["metadata"]
        ns, name = meta.get("namespace"), meta["name"]
        for _ in range(attempts):
            finalizers = list(meta.get("finalizers") or [])
            if JOB_TRACKING_FINALIZER not in finalizers:
                return
            at = finalizers.index(JOB_TRACKING_FINALIZER)
            patch = [{"op": "test", "path": f"/metadata/finalizers/{at}", "value": JOB_TRACKING_FINALIZER},
                     {"op": "remove", "path": f"/metadata/finalizers/{at}"}]
            try:
                await self.client.patch("v1", "pods", ns, name, patch, patch_type="json")
                return  # None (404) is fine: the pod is gone
            except ApiError as err:
                if err.status not in (409, 422):
                    raise
            fresh = await self.client.get("v1", "pods", ns, name)
            if fresh is None or pod_uid(fresh) != meta.get("uid"):
                return
            meta = fresh["metadata"]
        raise RuntimeError(f"could not remove the tracking finalizer of pod {ns}/{name}")


def _raise_first(results: list) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _error_text(err: BaseException) -> str:
    """What Go's err.Error() says: a Status error is its message."""
    if isinstance(err, ApiError):
        return err.message or str(err)
    return str(err) or repr(err)


def _namespace_terminating(err: BaseException) -> bool:
    """Creations in a namespace being deleted fail for good; the real controller ignores them."""
    return isinstance(err, ApiError) and err.status == 403 and "terminat" in (err.message or "").lower()


__all__ = ["Component", "Expectations", "JobController", "WorkQueue"]
