"""Status per CR, kept as JSON files in the workdir: the local stand-in for the API server's status subresource.

A record is the CR as `kubectl get -o json` would show it: apiVersion, kind, metadata, spec (as written
by the user) and status (the common status model: phase, conditions, progress, output, metrics...).
Bookkeeping of the local control plane (cache key, resolved-spec hash, log path) lives in annotations
under ``local.branchmerge.dev/`` so the status itself keeps exactly the operator's shape.
"""
from __future__ import annotations

import json
from pathlib import Path

from ...api.outputs import write_json_atomic
from ...api.resources import CustomResource
from .workdir import Workdir

ANNOTATION_PREFIX = "local.branchmerge.dev/"
CACHE_KEY = ANNOTATION_PREFIX + "cache-key"
SPEC_HASH = ANNOTATION_PREFIX + "spec-hash"
LOG = ANNOTATION_PREFIX + "log"
SOURCE = ANNOTATION_PREFIX + "source"
RANKS = ANNOTATION_PREFIX + "ranks"


def new_record(resource: CustomResource, source: str | None = None) -> dict:
    wire = resource.wire()
    doc = {"apiVersion": wire["apiVersion"], "kind": wire["kind"], "metadata": wire["metadata"], "spec": wire["spec"]}
    if source:
        doc["metadata"].setdefault("annotations", {})[SOURCE] = source
    doc["status"] = {"phase": "Pending", "conditions": [], "attempts": 0, "metrics": {}}
    return doc


def annotations(record: dict) -> dict:
    return record.setdefault("metadata", {}).setdefault("annotations", {})


def key_of(record: dict) -> str:
    return f"{record['kind']}/{record['metadata']['name']}"


class StatusFiles:
    def __init__(self, workdir: Workdir):
        self.workdir = workdir

    def load(self, key: str) -> dict | None:
        try:
            return json.loads(self.workdir.status_file(key).read_text())
        except (OSError, ValueError):
            return None

    def save(self, record: dict) -> None:
        write_json_atomic(self.workdir.status_file(key_of(record)), record)

    def all(self) -> list[dict]:
        records = []
        for path in self.workdir.status_files():
            try:
                records.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError):
                continue
        return records

    def sync(self, resource: CustomResource, source: str | None = None) -> dict:
        """The stored record with metadata/spec refreshed from the manifest; status carried over."""
        fresh = new_record(resource, source)
        old = self.load(resource.key)
        if old is not None:
            fresh["status"] = old.get("status") or fresh["status"]
            for name, value in annotations(old).items():
                if name.startswith(ANNOTATION_PREFIX) and name != SOURCE:
                    annotations(fresh).setdefault(name, value)
        return fresh
