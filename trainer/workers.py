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

Committed batches (:class:`ShardStore`), one folder per shard (TeacherGen) or per worker (Eval)::

    samples.jsonl   records, appended batch by batch (fsynced)
    commits.jsonl   one line per committed batch: {"batch", "prompts": [<ids of the batch's units>],
                    "end": <bytes of samples.jsonl>, "stats": {...}} -- the line IS the batch's done-marker
                    (written after the samples' fsync)
    complete.json   the shard finished (written atomically; TeacherGen)

On open by its writer, a torn last line of ``commits.jsonl`` is dropped and ``samples.jsonl`` is truncated to
the last committed ``end``: whatever a kill left half-written disappears, and that work is done again. Only
the worker that owns a folder opens it as writer; every other reader (the publisher, progress counts)
opens it with ``writer=False``, which changes nothing on disk and sees committed batches only: the folder
may be in the middle of a batch in another pod.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

from ..api.outputs import write_json_atomic
from .errors import InvalidInput, Retryable

WAIT_ENV = "BRANCHMERGE_SHARD_WAIT_SECONDS"  # worker 0 gives up after this long without progress anywhere
DEFAULT_WAIT_SECONDS = 7200.0
POLL_ENV = "BRANCHMERGE_SHARD_POLL_SECONDS"  # how often waiting workers look at the committed work
DEFAULT_POLL_SECONDS = 5.0
SPEC_FILE = "spec.json"


def env_number(name: str, default, parse=float, minimum=0, what: str = "a number of seconds"):
    """``$name`` read with ``parse`` (``default`` when unset or empty); InvalidInput (exit 2) when it is not
    ``what`` or is below ``minimum``."""
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = parse(text)
    except ValueError:
        raise InvalidInput(f"${name}: not {what}: {text!r}") from None
    if value < minimum:
        raise InvalidInput(f"${name}: must be >= {minimum}, got {text!r}")
    return value


def env_seconds(name: str, default: float) -> float:
    return env_number(name, default)


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _whole_lines(data: bytes) -> tuple[list[dict], int]:
    """The JSON lines before the first torn or unreadable one, and how many bytes they take."""
    records, good_bytes = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except ValueError:
            break
        good_bytes += len(line)
    return records, good_bytes


class ShardStore:
    """One folder of committed batches (layout above)."""

    def __init__(self, folder: Path, writer: bool = True):
        self.folder = Path(folder)
        self.writer = writer
        self.samples_path = self.folder / "samples.jsonl"
        self.commits_path = self.folder / "commits.jsonl"
        self.complete_path = self.folder / "complete.json"
        self.commits: list[dict] = []
        if writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._recover()
        else:
            self._read_commits()

    def _read_commits(self) -> None:
        """Committed batches, read only: a torn or half-written last line is skipped, not truncated."""
        try:
            self.commits, _ = _whole_lines(self.commits_path.read_bytes())
        except FileNotFoundError:
            return

    def _recover(self) -> None:
        if self.commits_path.exists():
            data = self.commits_path.read_bytes()
            self.commits, good_bytes = _whole_lines(data)
            if good_bytes != len(data):  # a torn last line from a killed writer
                with open(self.commits_path, "r+b") as f:
                    f.truncate(good_bytes)
                    os.fsync(f.fileno())
        end = self.commits[-1]["end"] if self.commits else 0
        if self.samples_path.exists() and self.samples_path.stat().st_size != end:
            with open(self.samples_path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        elif not self.samples_path.exists():
            self.samples_path.touch()
        _fsync_dir(self.folder)

    @property
    def done_prompts(self) -> set[str]:
        return {pid for c in self.commits for pid in c["prompts"]}

    @property
    def complete(self) -> bool:
        return self.complete_path.exists()

    def commit(self, prompt_ids: list[str], records: Iterable[dict], stats: dict) -> None:
        """Append the batch's samples, fsync, then append its commit line, fsync."""
        if not self.writer:
            raise RuntimeError(f"{self.folder}: opened read-only")
        with open(self.samples_path, "ab") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
            end = f.tell()
        entry = {"batch": len(self.commits), "prompts": list(prompt_ids), "end": end, "stats": stats}
        with open(self.commits_path, "ab") as f:
            f.write(json.dumps(entry).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.commits.append(entry)

    def mark_complete(self, stats: dict) -> None:
        if not self.writer:
            raise RuntimeError(f"{self.folder}: opened read-only")
        write_json_atomic(self.complete_path, stats)

    def read_samples(self) -> list[dict]:
        """The committed samples (a reader stops at the last commit's ``end``: bytes past it are a batch
        still being written)."""
        end = self.commits[-1]["end"] if self.commits else 0
        try:
            with open(self.samples_path, "rb") as f:
                data = f.read(end)
        except FileNotFoundError:
            data = b""
        return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
