"""Timestamps on the wire: RFC 3339 in UTC to the second (``2026-01-02T03:04:05Z``), the form Kubernetes
writes in ``metadata`` and Job status. Both control planes, the stages' records and the CR status fields
(``startTime``, ``completionTime``, ``lastTransitionTime``) are written and read through these two functions;
inside the code a time is epoch seconds.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_time(epoch: float | None = None) -> str:
    """``epoch`` (default: now) as RFC 3339 UTC, whole seconds."""
    return time.strftime(FORMAT, time.gmtime(time.time() if epoch is None else epoch))


def parse_time(text: str | None) -> float | None:
    """Epoch seconds of an RFC 3339 / ISO 8601 timestamp (``Z`` or an offset, fractional seconds allowed);
    None when empty or unreadable. A time without a zone is UTC: kopf writes its peering ``lastseen`` so."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
