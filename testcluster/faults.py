"""Fault injection for the API server stand-in: canned error responses, delays and abruptly closed watch
streams, for chaos/soak tests of the clients (kopf, the operator's client, the Informer).

``server.faults.add(status=503, method="PATCH", path_regex=r"/merges/.*/status", count=2)`` answers the next
two matching requests with a real ``Status`` (429 and 503 carry ``Retry-After``); ``add_delay(seconds, ...)``
holds matching requests before serving them (longer than a client's timeout = a timeout);
``drop_watches()`` cuts every open watch connection without a final chunk. ``injected`` counts what was
done, by kind ("500", "409", "delay", "drop_watch", ...). Thread-safe: tests call it from their thread.

Not emulated: faults inside a response (truncated bodies of non-watch requests), network partitions.
"""
from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable

REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
           410: "Expired", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 502: "BadGateway",
           503: "ServiceUnavailable", 504: "Timeout"}
MESSAGES = {409: "Operation cannot be fulfilled: the object has been modified; please apply your changes to the "
                 "latest version and try again",
            429: "Too many requests, please try again later.",
            500: "Internal error occurred: injected fault",
            503: "the server is currently unable to handle the request",
            504: "the server was unable to return a response in the time allotted"}


@dataclass
class Rule:
    status: int | None
    delay: float
    method: str | None
    path: re.Pattern | None
    count: int
    reason: str | None = None
    message: str | None = None
    retry_after: int | None = None

    def matches(self, method: str, path_qs: str) -> bool:
        return (self.method is None or self.method.upper() == method) and (
            self.path is None or self.path.search(path_qs) is not None)


class Faults:
    def __init__(self) -> None:
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self.injected: Counter = Counter()
        self._drop: Callable[[], None] | None = None  # set by the server: closes its watch streams

    def add(self, status: int = 500, method: str | None = None, path_regex: str | None = None, count: int = 1, *,
            reason: str | None = None, message: str | None = None, retry_after: int | None = None) -> None:
        with self._lock:
            self._rules.append(Rule(status, 0.0, method, re.compile(path_regex) if path_regex else None, count,
                                    reason, message, retry_after))

    def add_delay(self, seconds: float, method: str | None = None, path_regex: str | None = None,
                  count: int = 1) -> None:
        with self._lock:
            self._rules.append(Rule(None, seconds, method, re.compile(path_regex) if path_regex else None, count))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def drop_watches(self) -> None:
        if self._drop is not None:
            self._drop()

    def take(self, method: str, path_qs: str) -> Rule | None:
        """The first matching rule, consumed once (the server calls it per request)."""
        if not self._rules:
            return None
        with self._lock:
            for rule in self._rules:
                if rule.count > 0 and rule.matches(method, path_qs):
                    rule.count -= 1
                    if rule.count == 0:
                        self._rules.remove(rule)
                    self.injected["delay" if rule.status is None else str(rule.status)] += 1
                    return rule
        return None

    @staticmethod
    def status_body(rule: Rule) -> dict:
        code = rule.status or 500
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": rule.message or MESSAGES.get(code, "injected fault"),
                "reason": rule.reason or REASONS.get(code, "InternalError"), "details": {}, "code": code}
