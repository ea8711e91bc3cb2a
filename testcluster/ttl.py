"""The ttl-after-finished controller stand-in (kube-controller-manager's ``ttl-after-finished``): it
deletes a finished Job ``spec.ttlSecondsAfterFinished`` seconds after the lastTransitionTime of its
Complete/Failed condition. Like the real one it re-reads the Job before deleting (the cached TTL may be
stale), deletes with propagationPolicy Foreground (the Job stays, marked, until the garbage collector has
deleted its pods) and a UID precondition (a new Job of the same name is not touched), and requeues Jobs
whose time has not come.

Not emulated: metrics, clock-skew warnings, other kinds than batch/v1 Jobs (the real controller only
handles Jobs too).
"""
from __future__ import annotations

import asyncio
import logging
import time

from .client import ApiError, Client, Informer
from .jobapi import finish_time, is_finished
from .jobcontroller import Component, Key, WorkQueue, cancel_all, key_of

log = logging.getLogger("testcluster.ttl")


class TTLController(Component):
    """ttl-after-finished: delete finished Jobs ``spec.ttlSecondsAfterFinished`` after they finished."""

    thread_name = "ttl-after-finished-controller"

    def __init__(self, url: str, *, namespace: str | None = None, propagation: str = "Foreground",
                 user_agent: str = "kube-controller-manager/v1.33.0 (testcluster) ttl-after-finished-controller"):
        super().__init__()
        self.url = url
        self.namespace = namespace
        self.propagation = propagation
        self.user_agent = user_agent
        self.client: Client | None = None
        self.jobs: Informer | None = None
        self.queue: WorkQueue | None = None
        self.deleted: list[Key] = []  # what it deleted, in order (tests)

    async def run(self) -> None:
        self.client = Client(self.url, user_agent=self.user_agent)
        self.queue = WorkQueue()
        self.jobs = Informer(self.client, "batch/v1", "jobs", self.namespace, on_event=self._on_job)
        tasks = [asyncio.create_task(self.jobs.run())]
        try:
            await self.jobs.synced()
            tasks.append(asyncio.create_task(self._worker()))
            self.ready.set()
            await asyncio.gather(*tasks)
        finally:
            await cancel_all(tasks)
            await self.client.close()

    @staticmethod
    def time_left(job: dict, now: float) -> float | None:
        """Seconds until the Job expires (<= 0: expired); None when it needs no cleanup."""
        ttl = (job.get("spec") or {}).get("ttlSecondsAfterFinished")
        if ttl is None or (job.get("metadata") or {}).get("deletionTimestamp") or not is_finished(job):
            return None
        finished = finish_time(job)
        if finished is None:
            return None
        return finished + float(ttl) - now

    async def _on_job(self, type_: str, job: dict) -> None:
        if type_ == "DELETED":
            return
        left = self.time_left(job, time.time())
        if left is not None:
            self.queue.add_after(key_of(job), max(0.0, left))

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self._process(key)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                log.warning("ttl: job %s/%s: %s; retrying", key[0], key[1], err)
                self.queue.add_after(key, 1.0)
            finally:
                self.queue.done(key)

    async def _process(self, key: Key) -> None:
        job = self.jobs.cache.get(key)
        if job is None:
            return
        left = self.time_left(job, time.time())
        if left is None:
            return
        if left > 0:
            self.queue.add_after(key, left)
            return
        # The cached TTL may be stale: decide on a fresh read.
        fresh = await self.client.get("batch/v1", "jobs", key[0], key[1])
        if fresh is None:
            return
        left = self.time_left(fresh, time.time())
        if left is None:
            return
        if left > 0:
            self.queue.add_after(key, left)
            return
        try:
            await self.client.delete("batch/v1", "jobs", key[0], key[1], propagation=self.propagation,
                                     preconditions={"uid": fresh["metadata"].get("uid")})
        except ApiError as err:
            if err.status != 409:  # 409: the precondition failed, it is another Job now
                raise
            return
        self.deleted.append(key)
        log.debug("ttl: deleted job %s/%s", *key)
