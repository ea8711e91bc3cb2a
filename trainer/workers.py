"""Shared pieces of the stages whose work is split over workers (TeacherGen, Eval) and resumed from
committed batches.

The design (TeacherGen's, reused by Eval): worker ``i`` of ``W`` (``ctx.rank``/``ctx.world_size``, from
``$RANK``/``$WORLD_SIZE``; on Kubernetes the completion index and pod count of an Indexed Job of
``spec.resources.nodes`` pods) does a disjoint share of the work and commits it batch by batch into
``<output>.work/`` beside the output (same volume: it survives pod restarts). ``spec.json`` there holds a
fingerprint of everything that changes the results: a retried pod with the same fingerprint resumes from
the committed batches, a different one starts over -- worker 0 alone deletes (the others wait for its new
``spec.json``). Only worker 0 publishes, once every share is committed; it waits for its peers and gives up
with a retryable error once nothing has progressed for ``$BRANCHMERGE_SHARD_WAIT_SECONDS`` (default 7200).

Committed batches: :class:`ShardStore` (``trainer/teachergen/store.py``, re-exported here), one folder per
shard (TeacherGen) or per worker (Eval): records appended and fsynced, then one commit line per batch that
is the batch's done-marker; its writer drops a torn tail on open, readers change nothing on disk.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from .errors import InvalidInput, Retryable
from .publish import write_json_atomic
from .teachergen.store import ShardStore  # noqa: F401  (shared with Eval)

WAIT_ENV = "BRANCHMERGE_SHARD_WAIT_SECONDS"  # worker 0 gives up after this long without progress anywhere
DEFAULT_WAIT_SECONDS = 7200.0
POLL_ENV = "BRANCHMERGE_SHARD_POLL_SECONDS"  # how often waiting workers look at the committed work
DEFAULT_POLL_SECONDS = 5.0
SPEC_FILE = "spec.json"


def env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"${name}: not a number of seconds: {text!r}") from None
    if value < 0:
        raise InvalidInput(f"${name}: must be >= 0, got {text!r}")
    return value


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidInput(f"worker rank {rank} of world size {world_size}: need 0 <= RANK < WORLD_SIZE")


def work_folder(output_dir: Path) -> Path:
    """``<output>.work`` beside the output."""
    return output_dir.parent / f"{output_dir.name}.work"


def _marker_sha(work: Path) -> str | None:
    try:
        return json.loads((work / SPEC_FILE).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_work_dir(work: Path, fingerprint: dict, rank: int, wait_seconds: float, poll_seconds: float) -> None:
    """Make ``work`` this fingerprint's (``{"sha256", ...}``). A folder of another spec is set aside and
    deleted by worker 0 only (renamed first, so no worker ever sees or writes into a half-deleted folder);
    the other workers wait for worker 0's new ``spec.json``. A missing one is written by whoever comes first
    (all write the same bytes, atomically)."""
    marker = work / SPEC_FILE
    deadline = time.monotonic() + wait_seconds
    while True:
        if _marker_sha(work) == fingerprint["sha256"]:
            return
        if not marker.exists():
            write_json_atomic(marker, fingerprint)
            continue
        if rank == 0:  # a different spec: the committed work is not this run's
            set_aside(work)
            continue
        if time.monotonic() >= deadline:
            raise Retryable(f"{work}: still holds another spec's work after {wait_seconds:.0f} s "
                            f"(worker 0 starts it over); retry")
        time.sleep(poll_seconds)


def set_aside(work: Path) -> None:
    stale = work.parent / f".{work.name}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(work, stale)
    except FileNotFoundError:
        return
    shutil.rmtree(stale, ignore_errors=True)


def wait_until_done(missing: Callable[[], list], state: Callable[[list], tuple], wait_seconds: float,
                    poll_seconds: float, on_wait: Callable[[list], None],
                    stalled: Callable[[list], str]) -> None:
    """Worker 0: poll until ``missing()`` is empty. ``state(missing)`` changes whenever a peer makes
    progress; once it has not changed for ``wait_seconds``, raise Retryable(``stalled(missing)``): a dead
    or stuck peer does not hold worker 0's GPUs for ever, a slow but healthy one is waited for."""
    todo = missing()
    last_state = state(todo)
    last_progress = time.monotonic()
    while todo:
        if time.monotonic() - last_progress >= wait_seconds:
            raise Retryable(stalled(todo))
        on_wait(todo)
        time.sleep(poll_seconds)
        todo = missing()
        new_state = state(todo)
        if new_state != last_state:
            last_state, last_progress = new_state, time.monotonic()


def ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (short enough for a status message)."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(parts)
