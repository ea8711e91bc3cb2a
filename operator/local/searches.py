"""MergeSearch in the local runner: its trials' Merges and Evals become stages of the same run.

Each tick the runner hands a MergeSearch whose upstreams succeeded to ``LocalSearches.tick``: it replays the
search over the children's records (operator/searchplan.py), adds the children it asks for to the runner's
DAG (validated like manifests; upstream-first, so a stage never sees a missing upstream), and writes the
search's status. Children are ordinary stages: cached by their resolved spec and inputs, so a rerun
replays the whole search from the cache. A failed child fails its trial, not the run.
"""
from __future__ import annotations

import json

from ...api.graph import references
from ...api.validation import InvalidManifest, parse_resource
from ...api import conditions as cond
from ..policy import effective_phase
from ..search import SpaceError
from ..searchplan import Child, expand, selection_on_test, warn_selection_on_test


class LocalSearches:
    def __init__(self, runner):
        self.runner = runner
        self.children: dict[str, list[str]] = {}  # search key -> its child keys, in creation order
        self.child_of: dict[str, str] = {}  # child key -> search key

    def is_child(self, key: str) -> bool:
        return key in self.child_of

    def _observed(self, key: str) -> dict[str, Child]:
        out = {}
        for child in self.children.get(key, []):
            status = self.runner.records[child]["status"]
            ready = cond.get_condition(status, "Ready") or {}
            out[child] = Child(phase=effective_phase(status), metrics=status.get("metrics") or {},
                               output=status.get("output") or {}, message=ready.get("message", ""),
                               cost=status.get("cost"))
        return out

    def tick(self, key: str) -> None:
        runner = self.runner
        record = runner.records[key]
        before = json.dumps(record["status"], sort_keys=True)
        try:
            expansion = expand(record["metadata"]["name"], record["spec"], self._observed(key))
            for doc in expansion.create:
                self._add(key, doc)
        except (SpaceError, InvalidManifest) as err:
            runner.set_phase(key, "Failed", cond.INVALID_SPEC, str(err)[:1024])
            runner.finished.add(key)
            return
        status = record["status"]
        ready = cond.get_condition(expansion.status, "Ready") or {}
        for field in ("metrics", "output", "progress", "cost"):
            if field in expansion.status:
                status[field] = expansion.status[field]
        downstream = [r.wire() for r in runner.manifests.resources]
        warn_selection_on_test(status, selection_on_test(record["metadata"]["name"], record["spec"], downstream))
        if runner.current(key) != (expansion.status["phase"], ready.get("reason")):
            runner.set_phase(key, expansion.status["phase"], ready.get("reason", ""), ready.get("message", ""))
        elif json.dumps(status, sort_keys=True) != before:
            runner.save(key)
        if expansion.complete:
            runner.finished.add(key)

    def _add(self, search: str, doc: dict) -> None:
        runner = self.runner
        resource = parse_resource(doc)
        key = resource.key
        if key in runner.resources:
            return
        runner.resources[key] = resource
        runner.dag.resources[key] = resource
        runner.dag.upstreams[key] = list(dict.fromkeys(ref.key for ref in references(resource)))
        runner.order.append(key)
        runner.selected.insert(runner.selected.index(search), key)
        runner.records[key] = runner.status_files.sync(resource, f"trial of {search}")
        runner.save(key)
        self.children.setdefault(search, []).append(key)
        self.child_of[key] = search
