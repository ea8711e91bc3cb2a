"""Scripted fates for pods: instead of (or while) running a pod, the node stand-in plays one of the
failures a real cluster produces, so controllers can be tested against them.

``Fates.add(match, fate, count=1, after=..., **params)``: ``match`` is a predicate over the pod or a
label selector string; the first ``count`` pods it matches get the fate. Each pod gets at most one fate,
decided the first time a pod is looked at for that fate's phase (scheduling or running).

- ``Unschedulable`` (scheduling): PodScheduled=False, reason Unschedulable, ``message`` (default: the
  scheduler's text for a missing GPU); ``after`` seconds later (None: never) the pod is scheduled normally.
- ``NeverScheduled`` (scheduling): ignored by the scheduler; stays Pending without conditions.
- ``ImagePullBackOff`` (kubelet): its containers wait with ErrImagePull, then ImagePullBackOff; ``after``
  seconds past the first failed pull (None, the default: never) the image pulls at the next retry.
- ``OOMKilled`` (kubelet): runs, then SIGKILL after ``after`` seconds; exitCode 137, reason OOMKilled.
- ``Evicted`` (kubelet): runs, then killed after ``after`` seconds; phase Failed, reason Evicted, the
  kubelet's message, condition DisruptionTarget reason TerminationByKubelet.
- ``Preempted`` (kubelet, played as the scheduler would): after ``after`` seconds, condition
  DisruptionTarget reason PreemptionByScheduler, then the pod is deleted (gracefully).
- ``NodeLost`` (kubelet): after ``after`` seconds the node goes NotReady (unreachable taints); its pods get
  DisruptionTarget reason DeletionByTaintManager and are force-deleted; their processes are killed.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from .selectors import labels_match, parse_labels

SCHEDULING = {"Unschedulable", "NeverScheduled"}
KUBELET = {"ImagePullBackOff", "OOMKilled", "Evicted", "Preempted", "NodeLost"}
DEFAULT_AFTER = {"ImagePullBackOff": None, "OOMKilled": 0.5, "Evicted": 0.5, "Preempted": 0.5, "NodeLost": 0.5, "Unschedulable": None}


@dataclass
class Fate:
    name: str
    after: float | None = None
    params: dict = field(default_factory=dict)


@dataclass
class _Rule:
    match: Callable[[dict], bool]
    fate: str
    count: int
    after: float | None
    params: dict


class Fates:
    def __init__(self) -> None:
        self._rules: list[_Rule] = []
        self._by_pod: dict[str, Fate | None] = {}  # uid -> fate (None: decided, no fate) per phase key
        self._lock = threading.Lock()  # tests add fates from their thread; the node reads them in its loop
        self.applied: Counter = Counter()
        self.log: list[tuple[str, str, str]] = []  # (fate, namespace, name) in the order applied

    def add(self, match: Callable[[dict], bool] | str, fate: str, count: int = 1, *, after: float | None = -1.0,
            **params) -> None:
        if fate not in SCHEDULING | KUBELET:
            raise ValueError(f"unknown fate {fate!r}: one of {sorted(SCHEDULING | KUBELET)}")
        if isinstance(match, str):
            reqs = parse_labels(match)
            predicate = lambda pod: labels_match(reqs, pod)  # noqa: E731
        else:
            predicate = match
        if after == -1.0:
            after = DEFAULT_AFTER.get(fate)
        with self._lock:
            self._rules.append(_Rule(predicate, fate, count, after, params))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def decide(self, pod: dict, phase: set[str]) -> Fate | None:
        """The fate of ``pod`` among ``phase``'s fates (decided once per pod and phase)."""
        meta = pod.get("metadata") or {}
        key = f"{meta.get('uid')}/{min(phase)}"
        with self._lock:
            if key in self._by_pod:
                return self._by_pod[key]
            chosen = None
            for rule in self._rules:
                if rule.fate in phase and rule.count > 0 and rule.match(pod):
                    rule.count -= 1
                    chosen = Fate(rule.fate, rule.after, dict(rule.params))
                    break
            self._by_pod[key] = chosen
            return chosen

    def record(self, fate: str, pod: dict) -> None:
        meta = pod.get("metadata") or {}
        with self._lock:
            self.applied[fate] += 1
            self.log.append((fate, meta.get("namespace", ""), meta.get("name", "")))
