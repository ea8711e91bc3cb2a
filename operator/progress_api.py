"""Where stage pods report live progress: an HTTP endpoint on the operator. Only the operator writes CR
status; a pod has no API access at all (no service account token is mounted for the API server).

A report is ``POST /progress`` with a JSON event (``fraction``, ``message``, ``metrics``) and
``Authorization: Bearer <token>``, the token a projected ``serviceAccountToken`` volume holds for the
audience ``branchmerge.dev/progress`` (bound to the pod, rotated by the kubelet). The operator:

1. asks the API server who the token is (TokenReview, with that audience): a bound token names its pod
   (``authentication.kubernetes.io/pod-name`` / ``pod-uid``), and stops authenticating once the pod is gone;
2. reads that pod and walks its owners: the pod's controller must be a Job the operator created, and that
   Job's controller the CR in the operator's cache (matching uids at each step);
3. keeps the report for that CR and that Job only. The reconcile copies it into ``status.progress`` and
   ``status.metrics`` while that Job is the running attempt of the CR's current run.

So a pod can report only for the CR that owns it, never name another, and never touch ``status.output``:
outputs come from what the operator reads itself when the Job ends (termination message, run ConfigMap).
Answers: 202 accepted, 400 malformed, 401 not authenticated, 403 not a pod of a CR of this operator.
Like the API server's own authenticator, a successful review is cached for ``review_ttl`` seconds.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp.web

from ..api.finite import finite
from ..api.labels import LABEL_ATTEMPT, LABEL_RUN
from ..api.progress import AUDIENCE
from .failures import ACTIVE, job_state
from .naming import owner_key_of
from .watch_cache import Key, WatchCache

log = logging.getLogger("branchmerge.operator.progress")

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
MAX_BODY = 64 * 1024
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Report:
    job: str
    run_hash: str
    progress: dict
    metrics: dict = field(default_factory=dict)


def sanitize(event: Any) -> tuple[dict, dict]:
    """(progress, metrics) of a pod's event: bounded, finite, scalar metrics only."""
    if not isinstance(event, dict):
        raise Refused(400, "the report must be a JSON object")
    try:
        fraction = min(max(float(event.get("fraction", 0.0)), 0.0), 1.0)
    except (TypeError, ValueError):
        raise Refused(400, "fraction must be a number") from None
    if not math.isfinite(fraction):
        fraction = 0.0
    progress = {"fraction": round(fraction, 4), "message": str(event.get("message", ""))[:256]}
    raw = event.get("metrics") or {}
    if not isinstance(raw, dict):
        raise Refused(400, "metrics must be an object")
    metrics = {str(k)[:128]: v for k, v in list(raw.items())[:64]
               if isinstance(v, (int, str, bool)) or (isinstance(v, float) and math.isfinite(v))}
    metrics = {k: (v[:256] if isinstance(v, str) else v) for k, v in metrics.items()}
    return progress, finite(metrics)


def _controller(obj: dict) -> dict | None:
    return next((r for r in (obj.get("metadata") or {}).get("ownerReferences") or [] if r.get("controller")), None)


class ProgressReceiver:
    """``client`` is the operator's KubeClient; ``cache`` its view; ``wake(key)`` queues a reconcile."""

    def __init__(self, client, cache: WatchCache, wake: Callable[[Key], None], review_ttl: float = 10.0,
                 acting: Callable[[], bool] = lambda: True):
        self.client = client
        self.acting = acting  # False while another replica leads: its cache is the one that is current
        self.cache = cache
        self.wake = wake
        self.review_ttl = review_ttl
        self.reports: dict[Key, Report] = {}
        self._reviews: dict[str, tuple[float, str, str, str]] = {}  # token digest -> (until, ns, pod, uid)
        self._runner: aiohttp.web.AppRunner | None = None
        self.accepted = 0
        self.refused = 0

    # ---- server ----
    async def start(self, host: str, port: int) -> int:
        app = aiohttp.web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/progress", self.handle)
        self._runner = aiohttp.web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # the bound port when 0 was asked for
        return sockets[0].getsockname()[1] if sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if not self.acting():  # a standby: the Service may route the pod here; it reports again shortly
            return aiohttp.web.json_response({"error": "standby replica"}, status=503, headers={"Retry-After": "1"})
        try:
            header = request.headers.get("Authorization", "")
            if not header.startswith("Bearer ") or not header[7:].strip():
                raise Refused(401, "a bearer token is required")
            try:
                event = json.loads(await request.read())
            except ValueError:
                raise Refused(400, "the body is not JSON") from None
            key = await self.accept(header[7:].strip(), event)
        except Refused as err:
            self.refused += 1
            if err.status != 401:
                log.warning("progress report refused (%d): %s", err.status, err)
            return aiohttp.web.json_response({"error": str(err)}, status=err.status)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 -- the API server failed us: the pod reports again later
            log.warning("progress report not checked: %s", err)
            return aiohttp.web.json_response({"error": "try again"}, status=503)
        self.accepted += 1
        return aiohttp.web.json_response({"accepted": "/".join(key)}, status=202)

    # ---- checks ----
    async def accept(self, token: str, event: Any) -> Key:
        progress, metrics = sanitize(event)
        namespace, pod_name, pod_uid = await self._who(token)
        pod = await self.client.get("Pod", namespace, pod_name)
        if pod is None or pod["metadata"].get("uid") != pod_uid:
            raise Refused(403, f"pod {namespace}/{pod_name} does not exist (any more)")
        job_ref = _controller(pod)
        if not job_ref or job_ref.get("kind") != "Job":
            raise Refused(403, f"pod {namespace}/{pod_name} does not belong to a Job")
        job = self._job(namespace, job_ref.get("name", ""))
        if job is None or job["metadata"].get("uid") != job_ref.get("uid"):
            raise Refused(403, f"pod {namespace}/{pod_name}: its Job is not one this operator runs")
        owner = owner_key_of(job)
        cr_ref = _controller(job)
        cr = self.cache.crs.get((namespace, *owner.split("/", 1))) if owner else None  # type: ignore[arg-type]
        if cr is None or not cr_ref or cr["metadata"].get("uid") != cr_ref.get("uid"):
            raise Refused(403, f"pod {namespace}/{pod_name}: the CR owning its Job is gone")
        key: Key = (namespace, cr["kind"], cr["metadata"]["name"])
        self.reports[key] = Report(job["metadata"]["name"], (job["metadata"].get("labels") or {}).get(LABEL_RUN, ""),
                                   progress, metrics)
        self.wake(key)
        return key

    async def _who(self, token: str) -> tuple[str, str, str]:
        """(namespace, pod name, pod uid) of a bound token, from TokenReview (cached briefly)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._reviews.get(digest)
        if cached and cached[0] > time.monotonic():
            return cached[1:]
        answer = await self.client.request("POST", TOKEN_REVIEWS, {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": [AUDIENCE]}})
        status = (answer or {}).get("status") or {}
        if not status.get("authenticated") or AUDIENCE not in (status.get("audiences") or [AUDIENCE]):
            raise Refused(401, "the token is not valid for " + AUDIENCE)
        user = status.get("user") or {}
        parts = (user.get("username") or "").split(":")
        extra = user.get("extra") or {}
        pod_name, pod_uid = (extra.get(EXTRA_POD_NAME) or [None])[0], (extra.get(EXTRA_POD_UID) or [None])[0]
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"] or not pod_name or not pod_uid:
            raise Refused(403, "only a pod's bound service account token may report progress")
        if len(self._reviews) > 4096:
            self._reviews.clear()
        self._reviews[digest] = (time.monotonic() + self.review_ttl, parts[2], pod_name, pod_uid)
        return parts[2], pod_name, pod_uid

    def _job(self, namespace: str, name: str) -> dict | None:
        for (ns, _, _), jobs in self.cache.jobs.items():
            if ns == namespace and name in jobs:
                return jobs[name]
        return None

    # ---- what the reconcile does with a report ----
    def forget(self, key: Key) -> None:
        self.reports.pop(key, None)

    def apply(self, key: Key, status: dict, running_job: str | None) -> None:
        """Copy the report of ``running_job`` (the current run's active attempt) into a Running status."""
        report = self.reports.get(key)
        if report is None or running_job is None or report.job != running_job or status.get("phase") != "Running":
            return
        status["progress"] = report.progress
        if report.metrics:
            status["metrics"] = {**(status.get("metrics") or {}), **report.metrics}


def latest_job(run_hash: str, jobs: list[dict]) -> dict | None:
    """The Job of the current run's latest attempt, whatever its state."""
    mine = [j for j in jobs if (j["metadata"].get("labels") or {}).get(LABEL_RUN) == run_hash]
    return max(mine, key=lambda j: int((j["metadata"].get("labels") or {}).get(LABEL_ATTEMPT, "0") or 0)) \
        if mine else None


def running_job(run_hash: str, jobs: list[dict]) -> str | None:
    """The Job of the current run's latest attempt while it runs (the only one whose reports count)."""
    latest = latest_job(run_hash, jobs)
    return latest["metadata"]["name"] if latest is not None and job_state(latest) == ACTIVE else None
