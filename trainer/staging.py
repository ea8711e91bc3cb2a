"""Stage one hf:// input into a folder, once, however many pods ask at the same time.

``python -m branchmerge.trainer.staging REPO REVISION DEST``: the command of the operator's
``stage-input-N`` init containers. With a staging PVC shared by the pods of a gang and by concurrent
CRs, many of them stage the same input into the same ``DEST`` at once. Rules:

- ``DEST`` only ever appears whole: each downloader writes into a folder of its own
  (``DEST.partial-<host>-<random>``) and renames it into place (atomic within one filesystem);
- one download at a time per input: the downloader holds ``DEST.lock``, a directory (``mkdir`` is atomic
  on local filesystems and on NFS, where ``flock`` is not always honoured) whose mtime it refreshes
  every ``HEARTBEAT`` seconds; the others wait until ``DEST`` exists;
- a lock without a heartbeat for ``STALE`` seconds belongs to a dead pod: the next waiter takes it over
  (two waiters breaking it at once may download twice; both still publish atomically, one rename wins);
- leftovers of dead downloaders (``DEST.partial-*`` older than ``STALE``) are removed by the next holder.

Exit codes as the stages': 0 staged, 2 the repository or revision does not exist or is not accessible
(permanent), 3 anything else (retried).
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

STALE = float(os.environ.get("BRANCHMERGE_STAGING_STALE_SECONDS", "120"))
HEARTBEAT = float(os.environ.get("BRANCHMERGE_STAGING_HEARTBEAT_SECONDS", "15"))
POLL = float(os.environ.get("BRANCHMERGE_STAGING_POLL_SECONDS", "2"))


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT):
        try:
            os.utime(lock)
        except OSError:
            return


def _remove_leftovers(dest: Path) -> None:
    for old in dest.parent.glob(dest.name + ".partial-*"):
        age = _age(old)
        if age is not None and age > STALE:
            shutil.rmtree(old, ignore_errors=True)


def stage(download, dest: Path) -> bool:
    """Make ``dest`` exist, calling ``download(tmp_dir)`` at most once here; True if this call downloaded."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = dest.with_name(dest.name + ".lock")
    me = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    while not dest.is_dir():
        try:
            lock.mkdir()
        except FileExistsError:
            age = _age(lock)
            if age is not None and age > STALE:  # its holder stopped beating: take it over
                stale = lock.with_name(f"{lock.name}.stale-{me}")
                try:
                    lock.rename(stale)  # one waiter wins the rename; the others see it gone
                    shutil.rmtree(stale, ignore_errors=True)
                except OSError:
                    pass
                continue
            time.sleep(POLL)
            continue
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True)
        beat.start()
        tmp = dest.with_name(f"{dest.name}.partial-{me}")
        try:
            if dest.is_dir():  # published while this one waited for the lock
                return False
            _remove_leftovers(dest)
            download(tmp)
            try:
                tmp.rename(dest)
            except OSError:
                if not dest.is_dir():
                    raise
            return True
        finally:
            stop.set()
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(lock, ignore_errors=True)
    return False


def main(argv: list[str]) -> int:
    repo, revision, dest = argv[0], argv[1] or None, Path(argv[2])

    def download(tmp: Path) -> None:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=repo, revision=revision, local_dir=str(tmp))

    try:
        did = stage(download, dest)
    except Exception as err:  # noqa: BLE001 -- classified for the operator below
        name = type(err).__name__
        permanent = name in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError")
        print(f"staging {repo}@{revision or 'main'} failed: {name}: {err}", file=sys.stderr)
        return 2 if permanent else 3
    print(f"{'staged' if did else 'already staged'}: {repo}@{revision or 'main'} -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
