"""Polling until a condition holds: how the tests watch a cluster converge (as a user runs `kubectl get -w`)."""
from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """``predicate()``'s first truthy value; AssertionError naming ``what`` (and the last value) on timeout."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
