"""Atomic outputs: write into a temp folder next to the destination, digest it, rename it into place.

A killed stage leaves at most a ``.tmp-*`` folder beside the output, never a half-written output.
Every published folder holds ``_manifest.json`` (sha256 and size of each file), so readers can verify it,
and the resolved commit of each hf:// input the stage read (``inputs``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

MANIFEST = "_manifest.json"
# A model's card and what it is made from (trainer/card.py): about the output, not part of it. Regenerated when
# a downstream Eval finishes, so they stay out of the digest (an output's identity must not change then).
CARD = "README.md"
CARD_DIR = "_card"
_manifest_fields: dict = {}  # see manifest_fields


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def clean_stale_temps(dest: Path) -> None:
    for stale in dest.parent.glob(f".tmp-{dest.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def manifest_fields(**fields) -> Iterator[None]:
    """Add ``fields`` to every manifest written meanwhile: trainer/stage.py records the run's lineage there. A
    callable value is called when the manifest is written (what the stage cost up to its publication).
    One stage per process, so a module setting (stages may publish from any thread)."""
    global _manifest_fields
    before, _manifest_fields = _manifest_fields, {**_manifest_fields, **fields}
    try:
        yield
    finally:
        _manifest_fields = before


@contextlib.contextmanager
def atomic_folder(dest: Path, known_digests: dict[str, str] | None = None) -> Iterator[Path]:
    """Yield a temp folder; on success write the manifest and swap it into ``dest`` (replacing it).
    ``known_digests`` (file name -> sha256, filled by the caller inside the block) spares reading those files
    again; the caller vouches that they were not changed after being hashed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fields = {k: v() if callable(v) else v for k, v in _manifest_fields.items()}
        write_json_atomic(tmp / MANIFEST, {"files": folder_digests(tmp, known_digests), **fields})
        old = None
        if dest.exists():
            old = dest.parent / f".tmp-{dest.name}-old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(folder: Path) -> dict[str, str] | None:
    """The file digests of a published folder, or None if it was never completely published."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None
