"""Progress events: the one small interface every stage uses to report how far it is.

An event is a JSON object ``{"ts", "fraction", "message", "metrics": {...}}``. Sinks:
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

Sink = Callable[[dict], None]


class Progress:
    def __init__(self, path: str | None = None, min_interval: float = 1.0, enabled: bool = True):
        self.path = path if path is not None else os.environ.get("BRANCHMERGE_PROGRESS_FILE")
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
            event = {"ts": now, "message": message, "metrics": dict(self.metrics)}
            if fraction is not None:
                event["fraction"] = max(0.0, min(1.0, float(fraction)))
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


def read_events(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """Complete events appended since ``offset``, and the new offset (a partial last line is left)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events, offset + end
