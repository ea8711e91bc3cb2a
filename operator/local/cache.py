"""KFP-style caching: a stage is skipped when it already succeeded with the same resolved spec and the
same input contents, and its output is still there unchanged.

Input identity: the output digest an upstream reported (its ``_manifest.json``); for external inputs the
digest their lineage records (trainer/lineage.py ``content_digest``): a published folder's manifest digest, a
small file's or folder's sha256, or else a (path, size, mtime) fingerprint -- re-hashing a 60 GB external
model on every run would cost more than the run it saves.
"""
from __future__ import annotations

import hashlib
import json

from ...api.validation import parse_resource
from ...trainer.lineage import content_digest, input_refs
from ...trainer.publish import combined_digest, read_manifest
from ...trainer.uris import UnresolvableUri, local_path
from ..resolve import spec_hash


def input_uris(resolved: dict) -> dict[str, str]:
    """Field path -> URI of every model/dataset input of a resolved manifest."""
    return {path: ref.uri for path, ref in input_refs(parse_resource(resolved).spec)}  # type: ignore[attr-defined]


def input_digests(resolved: dict, upstream_digests: dict[str, str]) -> dict[str, str]:
    """Field path -> digest; ``upstream_digests`` maps an upstream output URI to the digest it reported."""
    return {path: upstream_digests.get(uri) or content_digest(uri) for path, uri in input_uris(resolved).items()}


def cache_key(resolved: dict, digests: dict[str, str]) -> str:
    canonical = json.dumps({"spec": spec_hash(resolved), "inputs": digests}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def output_intact(record: dict) -> bool:
    """The output the record's status points at still exists with the digest it had."""
    output = (record.get("status") or {}).get("output") or {}
    if not output.get("uri") or not output.get("digest"):
        return False
    try:
        files = read_manifest(local_path(output["uri"]))
    except UnresolvableUri:
        return False
    return files is not None and combined_digest(files) == output["digest"]


def is_cached(record: dict | None, key: str) -> bool:
    from .store import CACHE_KEY, annotations

    return (record is not None and (record.get("status") or {}).get("phase") == "Succeeded"
            and annotations(record).get(CACHE_KEY) == key and output_intact(record))
