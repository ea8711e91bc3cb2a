"""Atomic outputs: write into a temp folder next to the destination, digest it, rename it into place.

A killed stage leaves at most a ``.tmp-*`` folder beside the output, never a half-written output. The folder
format (``_manifest.json``) and its reader are the contract both control planes read: api/outputs.py.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from ..api.outputs import MANIFEST, folder_digests, write_json_atomic

_manifest_fields: dict = {}  # see manifest_fields


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
