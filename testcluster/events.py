"""Events as the test cluster's components record them: client-go's ``EventRecorder`` reduced, writing
core/v1 Events through the API (testcluster.client) like the Job controller, the scheduler and the kubelet
of a real cluster.

``EventRecorder(client, component, host="")``; ``recorder.event(obj, type, reason, message)`` queues an
Event about ``obj`` (any object with kind/apiVersion or given ``kind=``/``api_version=``) and returns at
once; one worker task writes the queue in order, as client-go's broadcaster does:
- an Event is named ``<object name>.<hex nanoseconds>`` in the object's namespace ("default" for
  cluster-scoped objects), with ``involvedObject`` (kind, namespace, name, uid, apiVersion,
  resourceVersion, fieldPath), ``reason``, ``message``, ``type``, ``source`` {component, host},
  ``reportingComponent``/``reportingInstance``, ``count``, ``firstTimestamp``, ``lastTimestamp``;
- correlation: the same event again (source, object, type, reason, message) within 10 minutes PATCHes the
  Event already written (``count`` + 1, ``lastTimestamp``) instead of creating one; an Event gone meanwhile
  (404) is created afresh;
- the spam filter: a token bucket per (source, object, type, reason, message), 25 events then one per
  5 minutes: a looping pod cannot flood the store (later repeats are dropped, not counted);
- writes are best effort: a failed write (5xx, 429, a timeout) is tried again a few times, then dropped;
  403 (a terminating namespace) and 422 drop it at once; a full queue (1000) drops new events.

Not emulated: events.k8s.io/v1 ``series`` (the scheduler of v1.33 writes that API; here every component writes
core/v1 Events, which read back through both APIs), the aggregator that combines more than 10 similar
events with different messages ("(combined from similar events): ..."), the 1 h TTL of Events in etcd.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections import OrderedDict

from .client import TRANSPORT_ERRORS, ApiError, Client

log = logging.getLogger("testcluster.events")

NORMAL, WARNING = "Normal", "Warning"
CORRELATION_WINDOW = 600.0     # client-go's maxLruCacheEntries window for identical events
SPAM_BURST, SPAM_REFILL = 25, 300.0  # defaultSpamBurst, one token per defaultSpamQPS=1/300 s
QUEUE_LENGTH = 1000
CACHE_SIZE = 4096
WRITE_TRIES = 3


def _stamp(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def reference(obj: dict, kind: str | None = None, api_version: str | None = None,
              field_path: str | None = None) -> dict:
    meta = obj.get("metadata") or {}
    ref = {"kind": kind or obj.get("kind", ""), "namespace": meta.get("namespace", ""), "name": meta.get("name", ""),
           "uid": meta.get("uid", ""), "apiVersion": api_version or obj.get("apiVersion", ""),
           "resourceVersion": meta.get("resourceVersion", "")}
    if not ref["namespace"]:
        del ref["namespace"]
    if field_path:
        ref["fieldPath"] = field_path
    return ref


class EventRecorder:
    def __init__(self, client: Client, component: str, host: str = ""):
        self.client = client
        self.component = component
        self.host = host
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._seen: OrderedDict[tuple, tuple[str, str, int, float, str]] = OrderedDict()  # -> ns, name, count, at, first
        self._buckets: OrderedDict[tuple, tuple[float, float]] = OrderedDict()  # -> tokens, at
        self.written = 0   # Events created or patched (tests)
        self.dropped = 0   # filtered, failed or not queued

    def event(self, obj: dict, type_: str, reason: str, message: str, *, kind: str | None = None,
              api_version: str | None = None, field_path: str | None = None) -> None:
        """Record an Event about ``obj`` (never raises, never waits)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._queue is None:
            self._queue = asyncio.Queue(QUEUE_LENGTH)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        ref = reference(obj, kind, api_version, field_path)
        try:
            self._queue.put_nowait((ref, type_, reason, message, time.time()))
        except asyncio.QueueFull:
            self.dropped += 1

    async def close(self) -> None:
        """Stop writing (what is queued is dropped)."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until the queue is written (tests)."""
        if self._queue is not None:
            async with asyncio.timeout(timeout):
                await self._queue.join()

    # ---- the worker --------------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            item = await self._queue.get()
            try:
                await self._record(*item)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - an Event is never worth a failure
                self.dropped += 1
                log.debug("event dropped: %r", err)
            finally:
                self._queue.task_done()

    def _allow(self, key: tuple, at: float) -> bool:
        tokens, last = self._buckets.pop(key, (float(SPAM_BURST), at))
        tokens = min(float(SPAM_BURST), tokens + (at - last) / SPAM_REFILL)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, at)
        while len(self._buckets) > CACHE_SIZE:
            self._buckets.popitem(last=False)
        return allowed

    async def _record(self, ref: dict, type_: str, reason: str, message: str, at: float) -> None:
        obj_key = (ref.get("kind"), ref.get("namespace", ""), ref.get("name"), ref.get("uid"), ref.get("apiVersion"))
        key = (self.component, self.host, *obj_key, type_, reason, message)
        if not self._allow(key, at):
            self.dropped += 1
            return
        ns = ref.get("namespace") or "default"
        seen = self._seen.pop(key, None)
        if seen is not None and at - seen[3] <= CORRELATION_WINDOW:
            _, name, count, _, first = seen
            patch = {"count": count + 1, "lastTimestamp": _stamp(at)}
            if await self._write(lambda: self.client.patch("v1", "events", ns, name, patch,
                                                          patch_type="strategic"), missing_ok=True):
                self._remember(key, (ns, name, count + 1, at, first))
                return
            # gone meanwhile: a new Event
        name = f"{ref.get('name', '')}.{time.time_ns():x}"
        body = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": name, "namespace": ns},
                "involvedObject": ref, "reason": reason, "message": message, "type": type_,
                "source": {"component": self.component, **({"host": self.host} if self.host else {})},
                "firstTimestamp": _stamp(at), "lastTimestamp": _stamp(at), "count": 1, "eventTime": None,
                "reportingComponent": self.component, "reportingInstance": self.host}
        if await self._write(lambda: self.client.create("v1", "events", ns, body)):
            self._remember(key, (ns, name, 1, at, _stamp(at)))

    def _remember(self, key: tuple, value: tuple) -> None:
        self._seen[key] = value
        while len(self._seen) > CACHE_SIZE:
            self._seen.popitem(last=False)

    async def _write(self, call, missing_ok: bool = False) -> bool:
        """True when written; False when dropped (or, with ``missing_ok``, when the Event is gone)."""
        for attempt in range(WRITE_TRIES):
            try:
                result = await call()
                if result is None and missing_ok:  # the client answers None on 404
                    return False
                self.written += 1
                return True
            except ApiError as err:
                if err.status == 404 and missing_ok:
                    return False
                if err.status < 500 and err.status != 429:
                    self.dropped += 1
                    log.debug("event not written: %s", err)
                    return False
            except TRANSPORT_ERRORS as err:
                log.debug("event write failed: %r", err)
            await asyncio.sleep(0.5 * 2 ** attempt)
        self.dropped += 1
        return False


__all__ = ["EventRecorder", "NORMAL", "WARNING", "reference"]
