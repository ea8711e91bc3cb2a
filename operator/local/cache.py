"""KFP-style caching: a stage is skipped when it already succeeded with the same resolved spec and the
same input contents, and its output is still there unchanged.

Input identity: the output digest an upstream reported (its ``_manifest.json``); for external inputs the
digest their lineage records (api/lineage.py ``content_digest``): a published folder's manifest digest, a
small file's or folder's sha256, or else a (path, size, mtime) fingerprint -- re-hashing a 60 GB external
model on every run would cost more than the run it saves.
"""
from __future__ import annotations

import hashlib
import json

from ...api.graph import input_refs
from ...api.lineage import content_digest
from ...api.outputs import published_intact
from ..resolve import spec_hash


def input_uris(resolved: dict) -> dict[str, str]:
    """Field path -> URI of every model/dataset input of a resolved manifest."""
    return {ref.path: ref.uri for ref in input_refs(resolved["spec"]) if ref.uri}


def input_digests(resolved: dict, upstream_digests: dict[str, str]) -> dict[str, str]:
    """Field path -> digest; ``upstream_digests`` maps an upstream output URI to the digest it reported."""
    return {path: upstream_digests.get(uri) or content_digest(uri) for path, uri in input_uris(resolved).items()}


def cache_key(resolved: dict, digests: dict[str, str]) -> str:
    canonical = json.dumps({"spec": spec_hash(resolved), "inputs": digests}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def is_cached(record: dict | None, key: str) -> bool:
    """The record succeeded under this cache key and the output its status points at is still the one it
    published."""
    from .status_files import CACHE_KEY, annotations

    if record is None or (record.get("status") or {}).get("phase") != "Succeeded":
        return False
    output = record["status"].get("output") or {}
    return annotations(record).get(CACHE_KEY) == key and published_intact(output.get("uri"), output.get("digest"))
