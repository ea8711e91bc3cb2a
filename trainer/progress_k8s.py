"""Live progress from a pod to its CR: a Progress sink that merge-patches ``status.progress`` and
``status.metrics`` through the CR's ``/status`` subresource.

Why this channel: the operator already watches the CRs, so progress arrives with no extra watch (pods
are never watched) and ``kubectl get`` shows it at once; the pod's ServiceAccount needs only ``patch``
on ``<kinds>/status`` in its own namespace (deploy/rbac/progress-reporter.yaml), and the spec, which
GitOps tools own, stays untouchable for it. The operator mounts a token only into pods that report.

Stdlib only (urllib): the data plane never imports kubernetes or kopf. Enabled by the stage entry point
when ``BRANCHMERGE_K8S_STATUS`` (the status path, set by the operator) is present.
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

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class StatusSink:
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
        self._thread = threading.Thread(target=self._loop, name="k8s-status", daemon=True)
        self.sent = 0
        self.errors = 0
        self._thread.start()
        atexit.register(self.flush)  # the last event of a short stage still reaches the status

    @classmethod
    def from_env(cls) -> "StatusSink":
        path = os.environ["BRANCHMERGE_K8S_STATUS"]
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        server = os.environ.get("BRANCHMERGE_K8S_SERVER") or f"https://{host}:{port}"
        interval = float(os.environ.get("BRANCHMERGE_K8S_STATUS_INTERVAL", "10"))
        token = os.path.join(SA_DIR, "token")
        ca = os.path.join(SA_DIR, "ca.crt")
        return cls(server.rstrip("/") + path, token if os.path.exists(token) else None,
                   ca if os.path.exists(ca) else None, interval)

    @staticmethod
    def patch_for(event: dict) -> dict:
        status: dict = {}
        if "fraction" in event or event.get("message"):
            status["progress"] = {"fraction": round(float(event.get("fraction", 0.0)), 4),
                                  "message": str(event.get("message", ""))[:256]}
        metrics = {k: v for k, v in (event.get("metrics") or {}).items()
                   if isinstance(v, (int, str, bool)) or (isinstance(v, float) and math.isfinite(v))}
        if metrics:
            status["metrics"] = metrics
        return {"status": status}

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
        headers = {"Content-Type": "application/merge-patch+json"}
        if self.token_file:  # re-read each time: projected tokens rotate
            try:
                with open(self.token_file) as f:
                    headers["Authorization"] = "Bearer " + f.read().strip()
            except OSError:
                pass
        body = json.dumps(finite(self.patch_for(event)), allow_nan=False).encode()
        request = urllib.request.Request(self.url, data=body, method="PATCH", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as resp:
                resp.read()
            self.sent += 1
        except Exception:  # progress must never fail or slow the stage
            self.errors += 1
