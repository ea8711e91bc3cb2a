"""The stage's side of progress: the one small interface every stage uses to report how far it is.

Events (their format and the local channel's reader: api/progress.py) go to:
- ``$BRANCHMERGE_PROGRESS_FILE``: appended as JSON lines (the local runner tails it);
- any callables registered with ``add_sink`` (the Kubernetes status reporter registers one).
Events are rate-limited (at most one every ``min_interval`` seconds unless forced) so a fast loop costs nothing.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable

from ..api.progress import FILE_ENV, progress_event

Sink = Callable[[dict], None]


class Progress:
    def __init__(self, path: str | None = None, min_interval: float = 1.0, enabled: bool = True):
        self.path = path if path is not None else os.environ.get(FILE_ENV)
        self.min_interval = min_interval
        self.enabled = enabled
        self.sinks: list[Sink] = []
        self.metrics: dict[str, Any] = {}
        self._last = 0.0
        self._lock = threading.Lock()

    def add_sink(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def update(self, fraction: float | None = None, message: str = "", force: bool = False, **metrics: Any) -> None:
        """Record metrics and emit an event if enough time has passed (or ``force``)."""
        with self._lock:
            self.metrics.update(metrics)
            now = time.time()
            if not self.enabled or (not force and now - self._last < self.min_interval):
                return
            self._last = now
            event = progress_event(message, self.metrics, fraction, ts=now)
        self._emit(event)

    def _emit(self, event: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(event, default=float) + "\n")
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:  # progress must never fail the stage
                pass
