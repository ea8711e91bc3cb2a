"""Resolve model/dataset/output URIs to local paths.

Stages only read and write local folders: ``file:///abs`` is the folder itself; ``pvc://claim/path``
is the claim mounted under ``$BRANCHMERGE_PVC_ROOT`` (``/mnt/pvc`` in pods, set by the operator);
``hf://`` and ``s3://`` must have been staged by the control plane into ``$BRANCHMERGE_STAGING_ROOT``
(Kubernetes init container) -- a stage never downloads at run time.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from .graph import input_refs


class UnresolvableUri(ValueError):
    """The URI cannot be turned into a local path in this environment (permanent: exit 2)."""


class InvalidHfUri(UnresolvableUri):
    """An hf:// URI that names no repository location (the spec is wrong: permanent)."""


# ---- hf:// URIs ---------------------------------------------------------------------------------------
#
#   hf://[models/|datasets/|spaces/]org/name[@revision][/subpath]
#
# huggingface_hub's own grammar (``parse_hf_uri``, HfFileSystem paths), parsed here without it so the
# operator needs no hub client: the revision ends at the next '/', except the refs the Hub names with
# slashes (``refs/pr/N``, ``refs/convert/NAME``); any other revision with a '/' (a branch ``feature/x``) is
# written URL-encoded (``@feature%2Fx``). An '@' after the subpath's first '/' belongs to the subpath.

HF_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_HF_PREFIX = {kind: prefix for prefix, kind in HF_TYPES.items()}
_SPECIAL_REF = re.compile(r"refs/(?:convert/[\w.-]+|pr/\d+)(?=/|$)", re.ASCII)
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")  # the Hub's rule, per part


@dataclass(frozen=True)
class HfUri:
    repo_type: str  # model, dataset or space (huggingface_hub's repo_type values)
    repo_id: str  # org/name
    revision: str | None = None  # decoded; None: the default branch
    subpath: str = ""  # a file or folder in the repository; "": all of it

    def uri(self) -> str:
        """The canonical spelling (type prefix only for datasets and spaces)."""
        prefix = "" if self.repo_type == "model" else _HF_PREFIX[self.repo_type] + "/"
        revision = ""
        if self.revision is not None:
            special = _SPECIAL_REF.fullmatch(self.revision)
            revision = "@" + (self.revision if special else quote(self.revision, safe=""))
        return f"hf://{prefix}{self.repo_id}{revision}" + (f"/{self.subpath}" if self.subpath else "")

    def allow_patterns(self, patterns: Sequence[str] = ()) -> list[str] | None:
        """snapshot_download's allow_patterns: the files matching ``patterns`` (a ref's ``allowPatterns``,
        relative to the subpath), else the subpath itself or everything below it; None: the whole repository."""
        escaped = re.sub(r"([*?[])", r"[\1]", self.subpath)  # fnmatch-literal
        if patterns:  # as huggingface_hub: a pattern ending in '/' is everything below that folder
            return [(f"{escaped}/" if escaped else "") + (p + "*" if p.endswith("/") else p) for p in patterns]
        if not self.subpath:
            return None
        return [escaped, escaped + "/*"]  # fnmatch's '*' crosses '/'


def _check_repo_id(uri: str, repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise InvalidHfUri(f"{uri}: expected hf://[datasets/|spaces/]org/name[@revision][/path], "
                           f"got repository {repo_id!r}")
    for part in parts:
        if not _REPO_PART.fullmatch(part) or "--" in part or ".." in part or part.endswith(".git"):
            raise InvalidHfUri(f"{uri}: {part!r} is not a repository or organization name (letters, digits, "
                               "'-', '_', '.', at most 96, not starting or ending with '-' or '.', no '--' or "
                               "'..', not ending in .git)")


def _check_subpath(uri: str, subpath: str) -> None:
    if any(part in ("", ".", "..") for part in subpath.split("/")):
        raise InvalidHfUri(f"{uri}: the path in the repository must not have empty, '.' or '..' parts")


def parse_hf_uri(uri: str) -> HfUri:
    """Split an hf:// URI into repository type, id, revision and subpath; InvalidHfUri says what is wrong."""
    if not uri.startswith("hf://"):
        raise InvalidHfUri(f"{uri}: not an hf:// URI")
    body = uri[len("hf://"):]
    first, _, rest = body.partition("/")
    repo_type = "model"
    if first in HF_TYPES:
        repo_type, body = HF_TYPES[first], rest
    elif first in _HF_PREFIX:  # as huggingface_hub: a singular prefix is a mistake, not an organization
        raise InvalidHfUri(f"{uri}: the type prefix is plural: hf://{first}s/...")
    elif first in ("kernels", "buckets"):
        raise InvalidHfUri(f"{uri}: {first} are not staged; use a model, dataset or space repository")
    body = body.rstrip("/")
    at = body.find("@")
    if at == -1 or body[:at].count("/") > 1:  # no revision ('@' in a file name is the file's)
        org, _, rest = body.partition("/")
        name, _, subpath = rest.partition("/")
        repo_id, revision = f"{org}/{name}" if name else org, None
    else:
        repo_id, after = body[:at], body[at + 1:]
        special = _SPECIAL_REF.match(after)
        raw = special.group() if special else after.split("/", 1)[0]
        subpath = after[len(raw) + 1:]
        revision = raw if special else unquote(raw)
        if not revision:
            raise InvalidHfUri(f"{uri}: empty revision after '@'")
    _check_repo_id(uri, repo_id)
    if subpath:
        _check_subpath(uri, subpath)
    return HfUri(repo_type, repo_id, revision, subpath)


def pvc_root() -> Path:
    return Path(os.environ.get("BRANCHMERGE_PVC_ROOT", "/mnt/pvc"))


def staging_root() -> Path:
    return Path(os.environ.get("BRANCHMERGE_STAGING_ROOT", "/mnt/staging"))


def staged_name(uri: str, allow_patterns: Sequence[str] = ()) -> str:
    """Folder name a remote URI is staged under (stable, filesystem-safe). A selection of its files
    (``allowPatterns``, in any order) is a copy of its own: another ref may want more of the repository."""
    parsed = urlparse(uri)
    readable = (parsed.netloc + parsed.path).strip("/").replace("/", "--").replace("@", "--")
    key = "\0".join([uri, *sorted(set(allow_patterns))])
    return f"{readable[:80]}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def hf_inputs(spec) -> list[tuple[str, tuple[str, ...]]]:
    """The distinct hf:// inputs of a resolved spec (a dict), each with its ref's allowPatterns, in spec order:
    what the operator stages and the stage reads (a copy per URI and selection)."""
    found = ((ref.uri, tuple(sorted(set(ref.allow_patterns))))  # the patterns' order means nothing
             for ref in input_refs(spec) if ref.uri and ref.uri.startswith("hf://"))
    return list(dict.fromkeys(found))


def local_path(uri: str, allow_patterns: Sequence[str] = ()) -> Path:
    """The local path behind ``uri`` (an hf:// ref's ``allowPatterns`` name the copy it was staged into)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise UnresolvableUri(f"{uri}: file URIs must be absolute (file:///path)")
        return Path(parsed.path)
    if parsed.scheme == "pvc":
        return pvc_root() / parsed.netloc / parsed.path.lstrip("/")
    if parsed.scheme in ("hf", "s3"):
        staged = staging_root() / staged_name(uri, allow_patterns)
        subpath = parse_hf_uri(uri).subpath if parsed.scheme == "hf" else ""
        if staged.exists():  # the staged folder holds the subpath at its place in the repository
            return staged / subpath if subpath else staged
        raise UnresolvableUri(f"{uri}: {parsed.scheme}:// inputs must be staged by the control plane "
                              f"(expected at {staged}); stages do not download")
    raise UnresolvableUri(f"{uri}: unsupported URI scheme {parsed.scheme!r}")


def file_uri(path: str | Path) -> str:
    return Path(path).resolve().as_uri()
