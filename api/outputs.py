"""A published output: the folder format every stage writes and both control planes read.

Every published folder holds ``_manifest.json``: ``files`` (the sha256 of each file, the card left out),
the lineage of the run that made it and the resolved commit of each hf:// input it read (``inputs``). The
output's identity is one digest over its files (``combined_digest``); a control plane records it in the CR's
status and trusts the folder again only while its manifest still gives that digest (``published_intact``).
The writing side (a temp folder swapped into place) is trainer/publish.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from .uris import UnresolvableUri, local_path

MANIFEST = "_manifest.json"
# A model's card and what it is made from (trainer/card.py): about the output, not part of it. Regenerated when
# a downstream Eval finishes, so they stay out of the digest (an output's identity must not change then).
CARD = "README.md"
CARD_DIR = "_card"


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_card(name: str) -> bool:
    return name == CARD or name.startswith(CARD_DIR + "/")


def folder_digests(folder: Path, known: dict[str, str] | None = None, *, output: bool = True) -> dict[str, str]:
    """sha256 of every file under ``folder``; ``known`` gives digests already computed by the writer. An
    ``output``'s digests leave its card out; a raw input's (``output=False``) count every file."""
    known = known or {}
    digests = {}
    for p in sorted(folder.rglob("*")):
        name = str(p.relative_to(folder))
        if p.is_file() and p.name != MANIFEST and not (output and is_card(name)):
            digests[name] = known[name] if name in known else sha256_file(p)
    return digests


def combined_digest(files: dict[str, str]) -> str:
    """One sha256 over (name, digest) pairs: the output's identity."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return "sha256:" + h.hexdigest()


def write_json_atomic(path: Path, data, indent: int | None = 2) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of it (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: Path) -> dict[str, str] | None:
    """The file digests of a published folder, or None if it was never completely published."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None


def published_intact(uri: str | None, digest: str | None) -> bool:
    """The output at ``uri`` is still the complete publication whose identity is ``digest``.

    The manifest is what the stage wrote once every file was in place, so comparing its digest (not
    re-hashing the files) is enough to tell a finished, unchanged output from a missing, half-written or
    republished one; an output this machine cannot reach is not intact here."""
    if not uri or not digest:
        return False
    try:
        files = read_manifest(local_path(uri))
    except UnresolvableUri:
        return False
    return files is not None and combined_digest(files) == digest


def attempt_succeeded(exit_code: int, result: dict) -> bool:
    """A finished stage process succeeded: its result says so and it exited 0, or the output its result names
    is published intact. Ranks can abort at interpreter exit after everything was written (2-rank gloo,
    SIGABRT; torchrun then exits 1): a complete output with the reported digest outweighs that exit code."""
    return result.get("phase") == "Succeeded" and (
        exit_code == 0 or published_intact(result.get("outputUri"), result.get("digest")))
