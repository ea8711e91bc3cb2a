"""The stand-in's etcd + watch cache: objects per storage key indexed by (namespace, name), one global
resourceVersion counter, a bounded event history per storage key (the watch window) and the open
watchers that each committed change fans out to (filtered by namespace and selectors).

Each object keeps the bytes-equivalent it was written with (``raw``), so an object stored before a CRD
gained a default keeps its old form until the next write, while every read decodes it through the
current schema (cached per schema generation).

Not emulated: etcd transactions across keys, leases/TTLs, the watch cache's slow-watcher termination
(queues are unbounded), consistent reads from a specific resourceVersion for lists.
"""
from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .selectors import Requirement, fields_match, labels_match


def jcopy(value: Any) -> Any:
    """A deep copy of a JSON value (several times faster than copy.deepcopy)."""
    if type(value) is dict:
        return {k: jcopy(v) for k, v in value.items()}
    if type(value) is list:
        return [jcopy(v) for v in value]
    return value


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


@dataclass(eq=False)
class Stored:
    raw: dict              # as written (includes metadata.resourceVersion)
    rv: int
    _gen: int = -1
    _view: dict | None = None
    _json: str | None = None

    def view(self, decode: Callable[[dict], dict], gen: int) -> dict:
        """The object as a read returns it (decoded through the current schema; do not mutate)."""
        if self._gen != gen or self._view is None:
            self._view = decode(self.raw)
            self._json = None
            self._gen = gen
        return self._view

    def json(self, decode: Callable[[dict], dict], gen: int) -> str:
        view = self.view(decode, gen)
        if self._json is None:
            self._json = dumps(view)
        return self._json


@dataclass(eq=False)
class Event:
    rv: int
    type: str               # ADDED / MODIFIED / DELETED
    obj: dict               # the object after the change (for DELETED: its last state, with the new rv)
    prev: dict | None       # the object before (None for ADDED)
    _json: str | None = None

    def json(self) -> str:
        if self._json is None:
            self._json = dumps(self.obj)
        return self._json


@dataclass(eq=False)
class Watcher:
    namespace: str | None
    labels: list[Requirement]
    fields: list[tuple[str, str, str]]
    field_values: Callable[[dict], dict]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def passes(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and (obj.get("metadata") or {}).get("namespace") != self.namespace:
            return False
        return labels_match(self.labels, obj) and (not self.fields or fields_match(self.fields,
                                                                                   self.field_values(obj)))

    def offer(self, event: Event) -> None:
        """The cacher's rule: an object entering the selection is ADDED, one leaving it is DELETED (its previous
        state with the event's resourceVersion)."""
        now = event.type != "DELETED" and self.passes(event.obj)
        before = self.passes(event.prev) if event.prev is not None else False
        if event.type == "DELETED":
            before = self.passes(event.obj)
        if now and before:
            self.queue.put_nowait(("MODIFIED", event.obj, event.json))
        elif now:
            self.queue.put_nowait(("ADDED", event.obj, event.json))
        elif before:
            if event.type == "DELETED":
                self.queue.put_nowait(("DELETED", event.obj, event.json))
            else:
                gone = dict(event.prev)
                gone["metadata"] = {**gone.get("metadata", {}), "resourceVersion": str(event.rv)}
                self.queue.put_nowait(("DELETED", gone, None))

    def close(self, error: dict | None = None, abort: bool = False) -> None:
        self.queue.put_nowait(("CLOSE", error, abort))


class Storage:
    """One storage key (e.g. "batch/jobs"): objects + history + watchers."""

    def __init__(self, history: int):
        self.objects: dict[tuple[str, str], Stored] = {}
        self.history: deque[Event] = deque()
        self.limit = history
        self.oldest_valid = 0  # a watch from a resourceVersion below this is 410 Gone
        self.watchers: set[Watcher] = set()

    def record(self, event: Event) -> None:
        self.history.append(event)
        while len(self.history) > self.limit:
            dropped = self.history.popleft()
            self.oldest_valid = dropped.rv
        for watcher in list(self.watchers):
            watcher.offer(event)

    def since(self, rv: int) -> list[Event] | None:
        """Events after ``rv``; None when some of them are no longer kept."""
        if rv < self.oldest_valid:
            return None
        return [e for e in self.history if e.rv > rv]

    def compact(self, keep: int, current_rv: int) -> None:
        while len(self.history) > keep:
            self.oldest_valid = self.history.popleft().rv
        if keep == 0:
            self.oldest_valid = current_rv
