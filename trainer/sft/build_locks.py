"""Stale JIT-build locks: a killed process must not make every later run on the machine wait for ever.

DeepSpeed builds its ops (the CPU shared-memory all-reduce, cpu_adam for offload, ...) with torch's
``cpp_extension.load``. Every process that loads an op, even one with nothing to rebuild, first creates
``<build dir>/lock`` with O_EXCL and removes it when ninja is done; the others poll until the file is gone,
with no timeout and no owner recorded. A process killed in that window (a test timeout, Ctrl-C on the
quickstart, an OOM kill) leaves the file, and every later run blocks in ``init_distributed``.

A lock is taken to be stale once neither it nor anything in its build folder has changed for
``$BRANCHMERGE_BUILD_LOCK_STALE_SECONDS`` (default 600): a live builder writes an object file every
minute or two. A watcher thread removes such locks for the whole life of the process, so a run that is
already waiting goes on. In a pod the build folder is the pod's own /tmp, so this matters for local runs.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

STALE_AFTER_ENV = "BRANCHMERGE_BUILD_LOCK_STALE_SECONDS"
DEFAULT_STALE_AFTER = 600.0


def build_root() -> Path:
    """Where torch builds JIT extensions: $TORCH_EXTENSIONS_DIR, else the user's cache folder (whose
    per-Python/accelerator subfolder, e.g. py311_cpu, ``release_stale_locks`` also looks into)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def stale_after() -> float:
    return float(os.environ.get(STALE_AFTER_ENV) or DEFAULT_STALE_AFTER)


def _last_change(folder: Path) -> float:
    times = []
    for entry in folder.iterdir():
        try:
            times.append(entry.stat().st_mtime)
        except FileNotFoundError:  # removed while we looked (ninja's temporaries)
            continue
    return max(times, default=0.0)


def release_stale_locks(root: Path, older_than: float, now: float | None = None) -> list[Path]:
    """Remove every ``root/[*/]*/lock`` whose build folder has not changed for ``older_than`` seconds."""
    now = time.time() if now is None else now
    removed = []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]) if root.is_dir() else []:
        try:
            if now - _last_change(lock.parent) < older_than:
                continue
            lock.unlink()
        except FileNotFoundError:  # its owner finished meanwhile
            continue
        removed.append(lock)
        print(f"branchmerge: removed a stale build lock left by a killed process: {lock}", file=sys.stderr)
    return removed


def watch_build_locks(interval: float = 15.0) -> threading.Thread:
    """Start a daemon thread that releases stale locks now and every ``interval`` seconds."""
    root, older_than = build_root(), stale_after()

    def loop() -> None:
        while True:
            release_stale_locks(root, older_than)
            time.sleep(interval)

    thread = threading.Thread(target=loop, name="branchmerge-build-locks", daemon=True)
    thread.start()
    return thread
