"""KFP-style caching: a stage is skipped when it already succeeded with the same resolved spec and the
same input contents, and its output is still there unchanged.

Input identity: the output digest an upstream reported (its ``_manifest.json``); for external inputs a
published folder's manifest digest, a small file's sha256, or else a (path, size, mtime) fingerprint --
re-hashing a 60 GB external model on every run would cost more than the run it saves.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...api.base import walk
from ...api.common import DatasetRef, ModelRef
from ...api.validation import parse_resource
from ...trainer.publish import combined_digest, read_manifest, sha256_file
from ...trainer.uris import UnresolvableUri, local_path
from ..resolve import spec_hash

SMALL_FILE = 64 << 20  # hash files below this size; fingerprint larger ones


def input_uris(resolved: dict) -> dict[str, str]:
    """Field path -> URI of every model/dataset input of a resolved manifest."""
    resource = parse_resource(resolved)
    return {path: obj.uri for path, obj in walk(resource.spec, "spec")  # type: ignore[attr-defined]
            if isinstance(obj, (ModelRef, DatasetRef)) and obj.uri}


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "stat:" + h.hexdigest()


def content_digest(uri: str) -> str:
    """Identity of an external input's content (see module doc)."""
    try:
        path = local_path(uri)
    except UnresolvableUri:
        return "uri:" + uri  # hf://org/name@rev and s3:// are staged immutably by revision/key
    if not path.exists():
        return "missing:" + uri
    if path.is_dir():
        files = read_manifest(path)
        return combined_digest(files) if files is not None else _fingerprint(path)
    if path.stat().st_size <= SMALL_FILE:
        return "sha256:" + sha256_file(path)
    return _fingerprint(path)


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
