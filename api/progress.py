"""Progress events: how a stage reports how far it is, and how the control planes receive it.

An event is a JSON object ``{"ts", "message", "metrics": {...}, "fraction"}`` (``fraction`` in [0, 1], absent
when unknown). The stage's writer is trainer/progress.py; two channels carry the events:

- locally, JSON lines appended to the file ``$BRANCHMERGE_PROGRESS_FILE`` names, which the local runner tails
  (``read_events``);
- on Kubernetes, ``POST``s from the stage pod to the operator's endpoint (operator/progress_api.py serves it,
  trainer/progress_k8s.py sends to it), authenticated by a projected token: where a pod finds the endpoint
  and its token is below.
"""
from __future__ import annotations

import json
import os
import time

FILE_ENV = "BRANCHMERGE_PROGRESS_FILE"  # the local channel: set by the local runner for each stage process

AUDIENCE = "branchmerge.dev/progress"  # the projected token's audience: good for this endpoint only
TOKEN_DIR = "/var/run/secrets/branchmerge"  # the projected serviceAccountToken volume's mountPath
TOKEN_FILE = f"{TOKEN_DIR}/token"
URL_ENV = "BRANCHMERGE_PROGRESS_URL"  # e.g. http://branchmerge-operator.branchmerge-system.svc:8081/progress
INTERVAL_ENV = "BRANCHMERGE_PROGRESS_INTERVAL"  # seconds between two reports of one pod


def progress_event(message: str, metrics: dict, fraction: float | None = None, ts: float | None = None) -> dict:
    """One event; a fraction outside [0, 1] is clamped (a stage's estimate may overshoot)."""
    event = {"ts": time.time() if ts is None else ts, "message": message, "metrics": dict(metrics)}
    if fraction is not None:
        event["fraction"] = max(0.0, min(1.0, float(fraction)))
    return event


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
