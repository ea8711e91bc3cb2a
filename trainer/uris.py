"""Resolve model/dataset/output URIs to local paths.

Stages only read and write local folders: ``file:///abs`` is the folder itself; ``pvc://claim/path``
is the claim mounted under ``$BRANCHMERGE_PVC_ROOT`` (``/mnt/pvc`` in pods, set by the operator);
``hf://`` and ``s3://`` must have been staged by the control plane into ``$BRANCHMERGE_STAGING_ROOT``
(Kubernetes init container) -- a stage never downloads at run time.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse


class UnresolvableUri(ValueError):
    """The URI cannot be turned into a local path in this environment (permanent: exit 2)."""


def pvc_root() -> Path:
    return Path(os.environ.get("BRANCHMERGE_PVC_ROOT", "/mnt/pvc"))


def staging_root() -> Path:
    return Path(os.environ.get("BRANCHMERGE_STAGING_ROOT", "/mnt/staging"))


def staged_name(uri: str) -> str:
    """Folder name a remote URI is staged under (stable, filesystem-safe)."""
    parsed = urlparse(uri)
    readable = (parsed.netloc + parsed.path).strip("/").replace("/", "--").replace("@", "--")
    return f"{readable[:80]}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"


def local_path(uri: str) -> Path:
    """The local path behind ``uri``."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise UnresolvableUri(f"{uri}: file URIs must be absolute (file:///path)")
        return Path(parsed.path)
    if parsed.scheme == "pvc":
        return pvc_root() / parsed.netloc / parsed.path.lstrip("/")
    if parsed.scheme in ("hf", "s3"):
        staged = staging_root() / staged_name(uri)
        if staged.exists():
            return staged
        raise UnresolvableUri(f"{uri}: {parsed.scheme}:// inputs must be staged by the control plane "
                              f"(expected at {staged}); stages do not download")
    raise UnresolvableUri(f"{uri}: unsupported URI scheme {parsed.scheme!r}")


def file_uri(path: str | Path) -> str:
    return Path(path).resolve().as_uri()
