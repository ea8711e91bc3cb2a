"""Per-shard committed batches: a killed worker loses at most the batch it was writing.

Layout of a shard folder (under ``<output>.work/``)::

    samples.jsonl   kept samples, appended batch by batch (fsynced)
    commits.jsonl   one line per committed batch: {"batch", "prompts": [...], "end": <bytes of samples.jsonl>,
                    "stats": {...}} -- the line IS the batch's done-marker (written after the samples' fsync)
    complete.json   the shard finished (written atomically)

On open by its writer, a torn last line of ``commits.jsonl`` is dropped and ``samples.jsonl`` is truncated to
the last committed ``end``: whatever a kill left half-written disappears, and those prompts are generated
again. Only the worker that owns a shard opens it as writer; every other reader (the publisher, progress
counts) opens it with ``writer=False``, which changes nothing on disk and sees committed batches only:
the shard may be in the middle of a batch in another pod.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from ..publish import write_json_atomic


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardStore:
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
            data = self.commits_path.read_bytes()
        except FileNotFoundError:
            return
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                self.commits.append(json.loads(line))
            except ValueError:
                break

    def _recover(self) -> None:
        good_bytes = 0
        if self.commits_path.exists():
            data = self.commits_path.read_bytes()
            for line in data.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break
                try:
                    self.commits.append(json.loads(line))
                except ValueError:
                    break
                good_bytes += len(line)
            if good_bytes != len(data):
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
