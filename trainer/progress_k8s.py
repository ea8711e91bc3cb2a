"""Live progress from a pod to the operator: a Progress sink that POSTs each event to the operator's
progress endpoint (operator/progress_api.py), which checks who sent it and copies it into the status of
the CR owning the pod. The pod itself has no access to the Kubernetes API: only the operator writes status.

Authentication: the bearer token of a projected ``serviceAccountToken`` volume with the audience
``branchmerge.dev/progress`` (api/progress.py), bound to this pod and rotated by the kubelet, so
it is re-read for every report. Useless against the API server (wrong audience) and dead once the pod is.

Stdlib only (urllib): the data plane never imports kubernetes or kopf. Enabled by the stage entry point
when ``BRANCHMERGE_PROGRESS_URL`` (set by the operator) is present.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import ssl
import threading
import time
import urllib.request

from ..api.finite import finite
from ..api.progress import INTERVAL_ENV, TOKEN_FILE, URL_ENV


class ReportSink:
    """Rate-limited and non-blocking: the newest event is sent by a background thread at most every
    ``interval`` seconds (a final event with fraction 1.0 goes out at once); failures are dropped."""

    def __init__(self, url: str, token_file: str | None, ca_file: str | None, interval: float = 10.0,
                 timeout: float = 5.0):
        self.url = url
        self.token_file = token_file
        self.context = ssl.create_default_context(cafile=ca_file) if url.startswith("https") and ca_file else None
        self.interval = interval
        self.timeout = timeout
        self._pending: dict | None = None
        self._sending = False
        self._last_sent = 0.0
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="progress-report", daemon=True)
        self.sent = 0
        self.errors = 0
        self._thread.start()
        atexit.register(self.flush)  # the last event of a short stage still reaches the status

    @classmethod
    def from_env(cls) -> "ReportSink":
        return cls(os.environ[URL_ENV], TOKEN_FILE if os.path.exists(TOKEN_FILE) else None,
                   os.environ.get("BRANCHMERGE_PROGRESS_CA"), float(os.environ.get(INTERVAL_ENV, "10")))

    @staticmethod
    def body_for(event: dict) -> dict:
        out: dict = {}
        if "fraction" in event or event.get("message"):
            out["fraction"] = round(float(event.get("fraction", 0.0)), 4)
            out["message"] = str(event.get("message", ""))[:256]
        metrics = {k: v for k, v in (event.get("metrics") or {}).items()
                   if isinstance(v, (int, str, bool)) or (isinstance(v, float) and math.isfinite(v))}
        if metrics:
            out["metrics"] = metrics
        return out

    def __call__(self, event: dict) -> None:
        with self._lock:
            self._pending = event
            self._lock.notify()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the newest event has been sent (or ``timeout``)."""
        deadline = time.time() + timeout
        with self._lock:
            self._last_sent = 0.0
            self._lock.notify()
            while (self._pending is not None or self._sending) and time.time() < deadline:
                self._lock.wait(0.05)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._pending is None:
                    self._lock.wait()
                final = float(self._pending.get("fraction", 0.0)) >= 1.0
                wait = self._last_sent + self.interval - time.time()
                if wait > 0 and not final:
                    self._lock.wait(wait)
                    continue
                event, self._pending = self._pending, None
                self._last_sent = time.time()
                self._sending = True
            try:
                self._send(event)
            finally:
                with self._lock:
                    self._sending = False
                    self._lock.notify_all()

    def _send(self, event: dict) -> None:
        headers = {"Content-Type": "application/json"}
        if self.token_file:  # re-read each time: projected tokens rotate
            try:
                with open(self.token_file) as f:
                    headers["Authorization"] = "Bearer " + f.read().strip()
            except OSError:
                pass
        body = json.dumps(finite(self.body_for(event)), allow_nan=False).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as resp:
                resp.read()
            self.sent += 1
        except Exception:  # progress must never fail or slow the stage
            self.errors += 1
