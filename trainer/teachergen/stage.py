"""TeacherGen stage: ``run(ctx)`` -- generate, verify, select, commit per shard, then publish the dataset.

Work state lives beside the output in ``<output>.work/`` (same volume, so it survives pod restarts):
``spec.json`` (a fingerprint of everything that changes the samples; a different spec starts over) and one
``shard-NNNNN/`` per shard (see :mod:`..workers`). Prompts go to shards by a hash of their id.

Workers: the stage's rank and world size (``$RANK``/``$WORLD_SIZE``, ``ctx.rank``/``ctx.world_size``)
decide its shards: worker ``i`` of ``W`` takes ``i, i + W, i + 2W, ...`` (:func:`assigned_shards`), so every
shard is run by exactly one worker. On Kubernetes the operator runs ``spec.resources.nodes`` pods as an
Indexed Job and sets RANK from the completion index and WORLD_SIZE to the pod count; locally
``branchmerge run`` starts one process (rank 0 of 1), which runs every shard. Launching W processes with
RANK=0..W-1 and WORLD_SIZE=W on one output (as pods on a shared PVC) is the same thing.

- A worker opens only its own shards for writing; it reads other shards without changing them (another
  pod may be in the middle of a batch there) and never deletes another worker's data: only worker 0
  starts the work folder over when the spec changed (others wait for its new ``spec.json``), and only
  worker 0 publishes (``atomic_folder`` clears stale temp folders beside the output: one writer only).
- Workers other than 0 exit as soon as their shards are complete (releasing their GPUs). Worker 0 then
  waits for every shard to be complete and publishes. The wait ends with a retryable error (exit 3; a
  retry resumes from the committed batches) once no shard has made progress (no committed batch, no
  completed shard) for ``$BRANCHMERGE_SHARD_WAIT_SECONDS`` (default 7200; set it through
  ``spec.resources.env``): a dead or stuck peer does not hold worker 0's GPUs for ever, a slow but
  healthy one is waited for.
- ``teacher.engine.dataParallelSize`` is not a knob of this stage: it names how many engine replicas
  the run has, and those replicas ARE the workers (one engine per pod, of ``tensorParallelSize`` GPUs).
  Their number is the world size, i.e. ``spec.resources.nodes`` on Kubernetes; the stage never starts
  several engines in one process or pod. When the two disagree the stage says so on stderr and goes by
  the world size. It is left out of the spec fingerprint, so changing it keeps committed work.

Generation streams: a worker hands all its unfinished prompts (its shards in order) to the engine's
``generate_iter``, which keeps a bounded window of prompts in flight and returns each prompt once its n
samples are done, so one long trace holds back neither the engine (new prompts take the freed slots) nor
the commits of the prompts beside it. Finished prompts are verified and committed per shard in groups of at
most ``batchSize`` prompts, or as soon as the oldest has waited ``$BRANCHMERGE_COMMIT_SECONDS`` (default 10;
0 commits every prompt). Each group is one atomic commit: a kill loses only finished, uncommitted prompts,
which the resumed run generates again with the same per-prompt seeds (``TeacherGenSession.streaming = False``
keeps the older path, one generate call per batch, for benchmarks).

Publishing is deterministic (records sorted by prompt id and sample index, whatever order they were
committed in): a rerun of a published spec finds the dataset published and leaves it as it is.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from ...api.outputs import read_manifest, write_json_atomic
from ...api.teachergen import TeacherGenSpec
from .. import decontamination
from ..engine import TextEngine, open_engine
from ..errors import InvalidInput, Retryable
from ..grading import grade
from ..publish import atomic_folder
from ..workers import (DEFAULT_POLL_SECONDS, DEFAULT_WAIT_SECONDS, POLL_ENV, WAIT_ENV, check_rank, env_seconds,
                       prepare_work_dir, ranges, wait_until_done, work_folder)
from .prompts import assign_ids, load_records, render, template_fields
from .selection import decide
from ..workers import ShardStore

DATASET_FILE = "data.jsonl"
MANIFEST_FILE = "teachergen.json"
COMMIT_ENV = "BRANCHMERGE_COMMIT_SECONDS"  # a finished prompt waits at most this long for its commit
DEFAULT_COMMIT_SECONDS = 10.0
MAX_EXTRACTED_CHARS = 512
_DONE = object()


def shard_of(prompt_id: str, shards: int) -> int:
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") % shards


def assigned_shards(rank: int, world_size: int, shards: int) -> list[int]:
    """The shards worker ``rank`` of ``world_size`` runs: ``rank, rank + W, rank + 2W, ...`` -- over all
    workers, every shard exactly once (a worker beyond the shard count gets none)."""
    check_rank(rank, world_size)
    return list(range(rank, shards, world_size))


def prompt_seed(base_seed: int, prompt_id: str) -> int:
    """Per-prompt seed from the prompt's id: the same samples whatever batch or shard it lands in."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{prompt_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def prompts_digest(prompts: list[tuple[str, dict]]) -> str:
    h = hashlib.sha256()
    for pid, record in prompts:
        h.update(json.dumps([pid, record], sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return h.hexdigest()


def fingerprint(spec: TeacherGenSpec, model_uri: str | None, prompts: list[tuple[str, dict]]) -> dict:
    """Everything that changes which samples are produced (not batch size, resources or output)."""
    doc = json.loads(spec.model_dump_json(by_alias=True, include={
        "teacher", "prompts", "template", "system_prompt", "sampling", "verify", "select", "filters", "shards"}))
    engine = doc["teacher"]["engine"]
    for knob in ("tensorParallelSize", "dataParallelSize", "gpuMemoryUtilization", "enforceEager"):
        engine.pop(knob, None)  # throughput knobs: changing them must not throw committed work away
    if engine.get("endpoint"):
        engine["endpoint"] = {k: engine["endpoint"][k] for k in ("baseUrl", "model")}
    doc["modelUri"] = model_uri
    doc["promptsSha256"] = prompts_digest(prompts)  # the same URI may hold other prompts by now
    return {"sha256": hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest(), "spec": doc}


class Totals:
    """Counters of committed work (restored from commit lines on resume)."""

    def __init__(self):
        self.prompts = 0
        self.generated = 0
        self.kept = 0
        self.rejected: Counter = Counter()
        self.tokens = 0
        self.kept_tokens = 0
        self.verdicts: Counter = Counter()
        self.gen_seconds = 0.0
        self.engine_errors: dict[str, str] = {}  # engine rejection reason -> the first message seen

    def add(self, stats: dict) -> None:
        self.prompts += stats["prompts"]
        self.generated += stats["generated"]
        self.kept += stats["kept"]
        self.rejected.update(stats["rejected"])
        self.tokens += stats["tokens"]
        self.kept_tokens += stats["keptTokens"]
        self.verdicts.update(stats.get("verdicts", {}))
        self.gen_seconds += stats["genSeconds"]
        for reason, message in stats.get("engineErrors", {}).items():
            self.engine_errors.setdefault(reason, message)

    def metrics(self, total_prompts: int) -> dict:
        return {"promptsDone": self.prompts, "promptsTotal": total_prompts, "samplesGenerated": self.generated,
                "samplesKept": self.kept, "samplesRejected": dict(sorted(self.rejected.items())),
                "tokensGenerated": self.tokens,
                "tokensPerSecond": round(self.tokens / self.gen_seconds, 2) if self.gen_seconds else 0.0}


class TeacherGenSession:
    streaming = True  # False: the batch path (one generate call per batch), kept for benchmarks

    def __init__(self, ctx):
        self.ctx = ctx
        self.spec: TeacherGenSpec = ctx.spec
        spec = self.spec
        self.model_path: Path | None = None
        self.model_uri = spec.teacher.model.uri if spec.teacher.model else None
        if spec.teacher.engine.name != "openai":
            self.model_path = ctx.input_path(spec.teacher.model, "teacher.model")
        records = load_records(ctx.input_path(spec.prompts.dataset, "prompts.dataset"))
        if not records:
            raise InvalidInput("prompts.dataset: no records")
        prompts = assign_ids(records, spec.prompts.id_field)
        if spec.prompts.limit:
            prompts = prompts[: spec.prompts.limit]
        missing = [f for f in template_fields(spec.template) if f not in prompts[0][1]]
        if missing:
            raise InvalidInput(f"template: records have no field {missing[0]!r} "
                               f"(fields: {', '.join(sorted(prompts[0][1]))})")
        # the decontamination gate: a prompt matching a benchmark question is never generated for
        self.gate = decontamination.gate_of(spec.decontaminate, ctx.input_path, "decontaminate")
        self.prompt_drops: dict[str, int] = {}
        if self.gate is not None:
            prompts = self._decontaminate_prompts(prompts)
        self.prompts = prompts
        self.by_shard: dict[int, list[tuple[str, dict]]] = {s: [] for s in range(spec.shards)}
        for pid, record in prompts:
            self.by_shard[shard_of(pid, spec.shards)].append((pid, record))
        self.rank = int(getattr(ctx, "rank", 0))
        self.world_size = int(getattr(ctx, "world_size", 1))
        self.mine = assigned_shards(self.rank, self.world_size, spec.shards)
        self.wait_seconds = env_seconds(WAIT_ENV, DEFAULT_WAIT_SECONDS)
        self.poll_seconds = env_seconds(POLL_ENV, DEFAULT_POLL_SECONDS)
        self.commit_seconds = env_seconds(COMMIT_ENV, DEFAULT_COMMIT_SECONDS)
        replicas = spec.teacher.engine.data_parallel_size
        if replicas > 1 and replicas != self.world_size and self.rank == 0:
            print(f"teachergen: teacher.engine.dataParallelSize is {replicas} but the run has {self.world_size} "
                  f"worker(s) (spec.resources.nodes on Kubernetes): the workers are the engine replicas, one "
                  f"engine per worker", file=sys.stderr)
        self.work = work_folder(ctx.output_dir)
        # a different spec or prompt set starts over: earlier shards are not this run's samples
        prepare_work_dir(self.work, fingerprint(spec, self.model_uri, self.prompts), self.rank,
                         self.wait_seconds, self.poll_seconds)
        self.totals = Totals()
        self.engine: TextEngine | None = None
        self.started = time.time()

    def _decontaminate_prompts(self, prompts: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        """Drop the prompts whose user message, or a record field it is made of, matches a benchmark question
        (a field alone: the template may add words the benchmark's question does not have)."""
        fields = template_fields(self.spec.template)
        texts = [[render(self.spec.template, record, pid)]
                 + [record[f] for f in fields if isinstance(record.get(f), str)] for pid, record in prompts]
        reasons = self.gate.check_records(texts)
        self.prompt_drops = decontamination.counts(reasons)
        kept = [p for p, reason in zip(prompts, reasons) if reason is None]
        if not kept:
            raise InvalidInput(f"decontaminate: all {len(prompts)} prompts match the benchmarks' questions "
                               f"({self.prompt_drops}); nothing is left to generate for")
        return kept

    def publish_sha(self) -> str:
        """What a published dataset was made from: the work's fingerprint, and the gate's benchmark questions
        and settings (a new gate re-filters the same committed samples)."""
        sha = fingerprint(self.spec, self.model_uri, self.prompts)["sha256"]
        if self.gate is None:
            return sha
        return hashlib.sha256(f"{sha}:{self.gate.fingerprint}".encode()).hexdigest()

    def decontamination_metrics(self, sample_drops: dict[str, int]) -> dict:
        """``decontamination``: records dropped by reason (prompts before generation + traces after)."""
        if self.gate is None:
            return {}
        return {"decontamination": decontamination.add_counts(self.prompt_drops, sample_drops)}

    # ---- work dir ---------------------------------------------------------------------------------------
    def shard_store(self, shard: int, writer: bool = False) -> ShardStore:
        """A shard's store; ``writer=True`` only for this worker's own shards (see :mod:`..workers`)."""
        if writer and shard not in self.mine:
            raise RuntimeError(f"shard {shard} belongs to another worker (this is {self.rank} of {self.world_size})")
        return ShardStore(self.work / f"shard-{shard:05d}", writer=writer)

    def my_shards(self) -> list[int]:
        return list(self.mine)

    # ---- generation -------------------------------------------------------------------------------------
    def _engine(self) -> TextEngine:
        if self.engine is None:
            self.engine = open_engine(self.spec.teacher.engine, self.model_path,
                                      system_prompt=self.spec.system_prompt)
        return self.engine

    def _verify(self, record: dict):
        v = self.spec.verify
        return lambda text: grade(v.kind, text, record, answer_field=v.answer_field, tests_field=v.tests_field,
                                  timeout_seconds=v.timeout_seconds, memory_mb=v.memory_mb)

    def _messages(self, user: str, response: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.spec.system_prompt}] if self.spec.system_prompt else []
        return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": response}]

    def run_batch(self, store: ShardStore, batch: list[tuple[str, dict]]) -> None:
        """The batch path: one generate call for the batch, then verify and commit it."""
        spec = self.spec
        users = [render(spec.template, record, pid) for pid, record in batch]
        conversations = [[{"role": "user", "content": u}] for u in users]
        sampling = spec.sampling
        engine = self._engine()  # opened lazily (a rerun with nothing to do never loads the model), not timed
        started = time.time()
        outputs = engine.generate(conversations, sampling, n=sampling.samples_per_prompt,
                                  seeds=[prompt_seed(sampling.seed, pid) for pid, _ in batch])
        self._commit_group(store, batch, users, outputs, time.time() - started)

    def run_stream(self, stores: dict[int, ShardStore], todo: list[tuple[int, str, dict]],
                   left: dict[int, int]) -> None:
        """The streaming path over all of this worker's unfinished prompts ``(shard, id, record)``: the engine
        keeps a window of prompts in flight and hands each back when its samples are done; finished prompts
        are verified and committed per shard in groups of at most ``batchSize`` prompts, or sooner once the
        oldest has waited ``$BRANCHMERGE_COMMIT_SECONDS``. A slow prompt no longer holds back the commits of
        the prompts beside it, nor leaves the engine half empty until it ends. ``left``: uncommitted prompts
        per shard (a shard is marked complete when it reaches 0)."""
        spec, sampling = self.spec, self.spec.sampling
        users = [render(spec.template, record, pid) for _, pid, record in todo]
        finished = self._engine().generate_iter(
            [[{"role": "user", "content": u}] for u in users], sampling, n=sampling.samples_per_prompt,
            seeds=[prompt_seed(sampling.seed, pid) for _, pid, _ in todo],
            tick=self.commit_seconds if self.commit_seconds > 0 else None)
        groups: dict[int, list[tuple[int, list]]] = {}  # shard -> (index in todo, completions), finish order
        since: dict[int, float] = {}  # shard -> when its oldest uncommitted prompt finished
        waited = 0.0  # seconds spent waiting on the engine since the last commit (that commit's genSeconds)

        def commit(shard: int) -> None:
            nonlocal waited
            group = groups.pop(shard)
            since.pop(shard)
            self._commit_group(stores[shard], [todo[i][1:] for i, _ in group], [users[i] for i, _ in group],
                               [completions for _, completions in group], waited)
            waited = 0.0
            left[shard] -= len(group)
            if not left[shard]:
                self._mark_complete(shard, stores[shard])

        try:
            while True:
                started = time.time()
                item = next(finished, _DONE)
                waited += time.time() - started
                if item is _DONE:
                    break
                if item is not None:
                    shard = todo[item[0]][0]
                    groups.setdefault(shard, []).append(item)
                    since.setdefault(shard, time.monotonic())
                    self._report(pending=sum(len(g) for g in groups.values()))
                for shard in [s for s in groups if len(groups[s]) >= spec.batch_size
                              or time.monotonic() - since[s] >= self.commit_seconds]:
                    commit(shard)
            for shard in list(groups):
                commit(shard)
        finally:
            close = getattr(finished, "close", None)
            if close is not None:  # stop the engine's requests when a commit or verification failed
                close()

    def _commit_group(self, store: ShardStore, batch: list[tuple[str, dict]], users: list[str], outputs: list,
                      gen_seconds: float) -> None:
        """Verify and select the samples of these prompts, then commit them (one atomic commit line)."""
        spec = self.spec

        def one(i: int):
            pid, record = batch[i]
            return decide(outputs[i], select=spec.select, filters=spec.filters, verify_kind=spec.verify.kind,
                          verify=self._verify(record))

        if spec.verify.kind == "code" and len(batch) > 1:  # sandbox runs wait on processes: overlap them
            with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
                decisions = list(pool.map(one, range(len(batch))))
        else:  # math-verify's timeouts need the main thread
            decisions = [one(i) for i in range(len(batch))]
        records, rejected, verdicts, engine_errors = [], Counter(), Counter(), {}
        tokens = kept_tokens = 0
        for (pid, record), user, prompt_decisions in zip(batch, users, decisions):
            for d in prompt_decisions:
                tokens += d.completion.num_tokens
                if d.verdict is not None:
                    verdicts[d.verdict.reason] += 1
                if d.rejected:
                    rejected[d.rejected] += 1
                    if d.completion.rejected:  # keep why the server refused it (one example per reason)
                        engine_errors.setdefault(d.rejected, d.completion.error or "")
                    continue
                kept_tokens += d.completion.num_tokens
                verdict = None
                if d.verdict is not None:
                    extracted = d.verdict.extracted
                    verdict = {"correct": d.verdict.correct, "reason": d.verdict.reason,
                               "extracted": extracted if extracted is None or len(extracted) <= MAX_EXTRACTED_CHARS
                               else extracted[:MAX_EXTRACTED_CHARS] + "..."}
                out = {"promptId": pid, "sampleIndex": d.index, "messages": self._messages(user, d.completion.text),
                       "verdict": verdict, "numTokens": d.completion.num_tokens,
                       "finishReason": d.completion.finish_reason}
                if spec.prompts.fields:
                    out["meta"] = {f: record.get(f) for f in spec.prompts.fields}
                records.append(out)
        stats = {"prompts": len(batch), "generated": sum(len(o) for o in outputs), "kept": len(records),
                 "rejected": dict(rejected), "tokens": tokens, "keptTokens": kept_tokens,
                 "verdicts": dict(verdicts), "genSeconds": round(gen_seconds, 4)}
        if engine_errors:
            stats["engineErrors"] = engine_errors
        store.commit([pid for pid, _ in batch], records, stats)
        self.totals.add(stats)
        self._report()

    def _report(self, message: str = "generating", force: bool = False, pending: int = 0) -> None:
        """Progress: committed prompts plus ``pending`` ones generated but not yet committed (commits may be
        grouped for up to $BRANCHMERGE_COMMIT_SECONDS; progress should not wait for them)."""
        total = len(self.prompts)
        done = self.totals.prompts + pending
        self.ctx.progress.update(done / total if total else 1.0, f"{message}: {done}/{total} prompts", force=force,
                                 **self.totals.metrics(total), **self.decontamination_metrics({}))

    def run_shards(self, shards: list[int]) -> None:
        """Generate this worker's shards: streamed through one engine window across all of them (shard by
        shard in order), or batch by batch (``streaming = False``)."""
        if not self.streaming:
            for shard in shards:
                self.run_shard(shard)
            return
        stores: dict[int, ShardStore] = {}
        todo: list[tuple[int, str, dict]] = []
        left: dict[int, int] = {}
        for shard in shards:
            store = self.shard_store(shard, writer=True)
            if store.complete:
                continue
            done = store.done_prompts
            mine = [(shard, pid, record) for pid, record in self.by_shard[shard] if pid not in done]
            stores[shard], left[shard] = store, len(mine)
            todo.extend(mine)
            if not mine:  # every prompt committed before a kill, the completion marker not yet written
                self._mark_complete(shard, store)
        if todo:
            self.run_stream(stores, todo, left)

    def run_shard(self, shard: int) -> None:
        """One shard on the batch path."""
        store = self.shard_store(shard, writer=True)
        if store.complete:
            return
        done = store.done_prompts
        todo = [p for p in self.by_shard[shard] if p[0] not in done]
        size = self.spec.batch_size
        for start in range(0, len(todo), size):
            self.run_batch(store, todo[start:start + size])
        self._mark_complete(shard, store)

    def _mark_complete(self, shard: int, store: ShardStore) -> None:
        store.mark_complete({"shard": shard, "prompts": len(self.by_shard[shard])})

    # ---- publish ----------------------------------------------------------------------------------------
    def _complete_path(self, shard: int) -> Path:
        return self.work / f"shard-{shard:05d}" / "complete.json"

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.spec.shards) if not self._complete_path(s).exists()]

    def _shard_state(self, shards: list[int]) -> tuple:
        """What changes when a shard makes progress: its commit log's size and its completion."""
        state = []
        for s in shards:
            try:
                size = (self.work / f"shard-{s:05d}" / "commits.jsonl").stat().st_size
            except FileNotFoundError:
                size = -1
            state.append((s, size, self._complete_path(s).exists()))
        return tuple(state)

    def count_committed(self) -> Totals:
        totals = Totals()
        for s in range(self.spec.shards):
            for commit in self.shard_store(s).commits:
                totals.add(commit["stats"])
        return totals

    def wait_for_other_shards(self) -> None:
        """Worker 0: wait until every shard is complete; Retryable once none made progress for
        ``wait_seconds``."""
        def on_wait(missing: list[int]) -> None:
            self.totals = self.count_committed()
            self._report(f"waiting for shards {ranges(missing)}")

        def stalled(missing: list[int]) -> str:
            owners = sorted({s % self.world_size for s in missing})
            return (f"shards {ranges(missing)} of {self.spec.shards} (workers {ranges(owners)} of "
                    f"{self.world_size}) not complete and no progress for {self.wait_seconds:.0f} s "
                    f"(${WAIT_ENV}); retry to resume from the committed batches")

        wait_until_done(self.missing_shards, self._shard_state, self.wait_seconds, self.poll_seconds, on_wait,
                        stalled)

    def publish(self) -> dict:
        totals, records = Totals(), []
        for s in range(self.spec.shards):
            store = self.shard_store(s)
            for commit in store.commits:
                totals.add(commit["stats"])
            records.extend(store.read_samples())
        records.sort(key=lambda r: (r["promptId"], r["sampleIndex"]))
        keys = [(r["promptId"], r["sampleIndex"]) for r in records]
        if len(set(keys)) != len(keys):  # cannot happen with committed batches; never publish it if it does
            raise Retryable("duplicate (promptId, sampleIndex) in committed shards")
        sample_drops: dict[str, int] = {}
        if self.gate is not None:  # kept traces that restate a benchmark question
            reasons = self.gate.check_records([[m["content"] for m in r["messages"] if m["role"] == "assistant"]
                                               for r in records])
            sample_drops = decontamination.counts(reasons)
            records = [r for r, reason in zip(records, reasons) if reason is None]
        metrics = {**totals.metrics(len(self.prompts)), **self.decontamination_metrics(sample_drops)}
        spec = self.spec
        manifest = {
            "kind": "TeacherGen", "format": "chat-jsonl", "dataset": DATASET_FILE,
            "counts": {"prompts": len(self.prompts), "promptsDone": totals.prompts, "samplesGenerated":
                       totals.generated, "samplesKept": totals.kept, "samplesRejected": sum(totals.rejected.values()),
                       "promptsWithSamples": len({r["promptId"] for r in records}), "shards": spec.shards},
            "acceptance": {"keptFraction": round(totals.kept / totals.generated, 6) if totals.generated else 0.0,
                           "rejectedByReason": dict(sorted(totals.rejected.items())),
                           "verdicts": dict(sorted(totals.verdicts.items())),
                           "engineErrors": dict(sorted(totals.engine_errors.items()))},
            "tokens": {"generated": totals.tokens, "kept": totals.kept_tokens,
                       "meanKept": round(totals.kept_tokens / totals.kept, 2) if totals.kept else 0.0,
                       "tokensPerSecond": metrics["tokensPerSecond"]},
            "teacher": {"modelUri": self.model_uri,
                        "engine": spec.teacher.engine.model_dump(by_alias=True, exclude={"endpoint"}),
                        "endpoint": ({"baseUrl": spec.teacher.engine.endpoint.base_url,
                                      "model": spec.teacher.engine.endpoint.model}
                                     if spec.teacher.engine.endpoint else None)},
            "template": spec.template, "systemPrompt": spec.system_prompt,
            "sampling": spec.sampling.model_dump(by_alias=True),
            "verify": spec.verify.model_dump(by_alias=True), "select": spec.select.model_dump(by_alias=True),
            "filters": spec.filters.model_dump(by_alias=True),
            "specSha256": self.publish_sha(),
        }
        if self.gate is not None:
            manifest["counts"]["samplesPublished"] = len(records)
            manifest["decontamination"] = {**decontamination.describe(spec.decontaminate),
                                           "prompts": self.prompt_drops, "samples": sample_drops,
                                           "dropped": metrics["decontamination"]}
        with atomic_folder(self.ctx.output_dir) as tmp:
            with open(tmp / DATASET_FILE, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            write_json_atomic(tmp / MANIFEST_FILE, manifest)
        return metrics

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def run(ctx, *, engine: TextEngine | None = None) -> dict:
    """The stage. ``engine``: an already open engine to use (benchmarks, tests); it is left open.
    Worker 0 returns the published dataset's metrics; the others those of the work they see committed."""
    session = TeacherGenSession(ctx)
    session.engine = engine
    try:
        session.totals = session.count_committed()  # work committed by earlier attempts and other workers
        session._report("resuming", force=True)
        session.run_shards(session.my_shards())
    finally:
        if engine is None:
            session.close()
    if session.rank != 0:  # worker 0 waits for this worker's shards and publishes
        return session.totals.metrics(len(session.prompts))
    session.wait_for_other_shards()
    if read_manifest(ctx.output_dir) is not None and _published_sha(ctx.output_dir) == session.publish_sha():
        session.totals = session.count_committed()  # a rerun of a published spec: the dataset is already there
        metrics = session.totals.metrics(len(session.prompts))
        if session.gate is not None:
            metrics.update(session.decontamination_metrics(_published_gate(ctx.output_dir).get("samples", {})))
    else:
        metrics = session.publish()
    ctx.progress.update(1.0, "published", force=True, **metrics)
    return metrics


def _published_gate(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text()).get("decontamination") or {}
    except (OSError, ValueError):
        return {}


def _published_sha(folder: Path) -> str | None:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text()).get("specSha256")
    except (OSError, ValueError):
        return None
