"""Eval's generation split over workers and committed in chunks (the TeacherGen design, ``trainer/workers.py``).

Every sample of every benchmark is one request, numbered in run/question/sample order. Worker ``i`` of
``W`` sends requests ``i, i + W, i + 2W, ...`` (striding spreads long and short benchmarks evenly), in
chunks of ``$BRANCHMERGE_EVAL_CHUNK_REQUESTS`` (default 256); each answered chunk is committed to the
worker's own folder ``<output>.work/worker-NNNNN/`` (one :class:`ShardStore`; commit ids are request
numbers), so a killed pod loses at most the chunk in flight and its retry sends only what is not committed.
A request committed by any worker is never sent again, so a retry with another worker count resumes too.

``spec.json`` holds the fingerprint of what decides the answers: model (URI and its published manifest),
engine settings that change outputs, sampling, and every request (conversation and seed). Grading settings
are not in it: grading is redone from the committed answers on every publish.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine import Completion
from ..workers import ShardStore, env_number

CHUNK_ENV = "BRANCHMERGE_EVAL_CHUNK_REQUESTS"
# Big enough to keep a vLLM batch (or maxConcurrency streams) busy, small enough that a lost chunk is cheap;
# each chunk ends waiting for its longest answer, so bigger chunks waste less engine time on the tail.
DEFAULT_CHUNK = 256
THROUGHPUT_KNOBS = ("tensorParallelSize", "dataParallelSize", "gpuMemoryUtilization", "enforceEager")


@dataclass(frozen=True)
class Request:
    index: int
    benchmark: str
    question: str
    sample: int
    conversation: list
    seed: int


def chunk_size() -> int:
    return env_number(CHUNK_ENV, DEFAULT_CHUNK, int, 1, "a whole number of requests")


def assigned(total: int, rank: int, world_size: int) -> list[int]:
    """The request numbers of worker ``rank``: over all workers, every request exactly once."""
    return list(range(rank, total, world_size))


def fingerprint(spec, model_path: Path | None, requests: list[Request]) -> dict:
    """Everything that changes the answers (not resources, worker count, chunk size or grading settings)."""
    engine = spec.engine.wire()
    for knob in THROUGHPUT_KNOBS:
        engine.pop(knob, None)  # changing them must not throw committed answers away
    if engine.get("endpoint"):
        engine["endpoint"] = {k: engine["endpoint"][k] for k in ("baseUrl", "model")}
    requests_sha = hashlib.sha256()
    for r in requests:
        requests_sha.update(json.dumps([r.conversation, r.seed], sort_keys=True, ensure_ascii=False).encode() + b"\n")
    doc = {"modelUri": spec.model.uri if spec.model is not None else None,
           "modelManifestSha256": _manifest_sha(model_path), "engine": engine, "sampling": spec.sampling.wire(),
           "requests": len(requests), "requestsSha256": requests_sha.hexdigest()}
    return {"sha256": hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest(), "spec": doc}


def _manifest_sha(model_path: Path | None) -> str | None:
    """A model republished at the same URI (an upstream SFT run again) must not reuse the old answers."""
    if model_path is None:
        return None
    try:
        return hashlib.sha256((Path(model_path) / "_manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


def completion_record(request: Request, completion: Completion) -> dict:
    record: dict[str, Any] = {"request": request.index, "benchmark": request.benchmark,
                              "question": request.question, "sample": request.sample, "seed": request.seed,
                              "text": completion.text,
                              "numTokens": completion.num_tokens, "finishReason": completion.finish_reason}
    if completion.rejected:
        record.update(rejected=completion.rejected, error=completion.error)
    return record


def completion_from(record: dict) -> Completion:
    return Completion(text=record["text"], token_ids=None, num_tokens=record["numTokens"],
                      finish_reason=record["finishReason"], rejected=record.get("rejected"),
                      error=record.get("error"))


class EvalWork:
    """This worker's committed chunks, and a read-only view of every worker's."""

    def __init__(self, work: Path, rank: int):
        self.work = work
        self.rank = rank
        self.store = ShardStore(self._folder(rank), writer=True)  # drops what a kill left half-written

    def _folder(self, rank: int) -> Path:
        return self.work / f"worker-{rank:05d}"

    def _folders(self) -> list[Path]:
        return sorted(p for p in self.work.glob("worker-*") if p.is_dir())

    def _readers(self) -> list[ShardStore]:
        return [ShardStore(p, writer=False) for p in self._folders()]

    def committed(self) -> set[int]:
        """Request numbers committed by any worker (an earlier attempt's, with another worker count, too)."""
        return {int(i) for store in self._readers() for i in store.done_prompts}

    def commit(self, requests: list[Request], completions: list[Completion], seconds: float) -> None:
        stats = {"requests": len(requests), "tokens": sum(c.num_tokens for c in completions),
                 "genSeconds": round(seconds, 4)}
        self.store.commit([r.index for r in requests],
                          [completion_record(r, c) for r, c in zip(requests, completions)], stats)

    def state(self) -> tuple:
        """Changes whenever any worker commits a chunk (worker 0's wait watches it)."""
        sizes = []
        for folder in self._folders():
            try:
                sizes.append((folder.name, (folder / "commits.jsonl").stat().st_size))
            except FileNotFoundError:
                sizes.append((folder.name, -1))
        return tuple(sizes)

    def answers(self) -> dict[int, Completion]:
        """Every committed answer by request number (the first commit wins should two workers hold one)."""
        found: dict[int, Completion] = {}
        for store in self._readers():
            for record in store.read_samples():
                found.setdefault(int(record["request"]), completion_from(record))
        return found
