"""TeacherGen stage: ``run(ctx)`` -- generate, verify, select, commit per shard, then publish the dataset.

Work state lives beside the output in ``<output>.work/`` (same volume, so it survives pod restarts):
``spec.json`` (a fingerprint of everything that changes the samples; a different spec starts over) and one
``shard-NNNNN/`` per shard (see :mod:`.store`). Prompts go to shards by a hash of their id.

Workers: on Kubernetes an Indexed Job runs one worker per index (``$JOB_COMPLETION_INDEX``), which takes
the shards ``index, index + W, ...`` (W = ``$BRANCHMERGE_WORKERS``, default: the shard count), then waits for
the other shards; the worker that sees every shard complete publishes. Locally one process loops over all
shards. Publishing is deterministic (records sorted by prompt id and sample index), so a second publisher
writes the very same folder.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

from ...api.teachergen import TeacherGenSpec
from ..engine import TextEngine, open_engine
from ..errors import InvalidInput, Retryable
from ..grading import grade
from ..publish import atomic_folder, read_manifest, write_json_atomic
from .prompts import assign_ids, load_records, render, template_fields
from .selection import decide
from .store import ShardStore

DATASET_FILE = "data.jsonl"
MANIFEST_FILE = "teachergen.json"
WORKER_INDEX_ENV = "JOB_COMPLETION_INDEX"
WORKERS_ENV = "BRANCHMERGE_WORKERS"
WAIT_ENV = "BRANCHMERGE_SHARD_WAIT_SECONDS"
MAX_EXTRACTED_CHARS = 512


def shard_of(prompt_id: str, shards: int) -> int:
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") % shards


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

    def add(self, stats: dict) -> None:
        self.prompts += stats["prompts"]
        self.generated += stats["generated"]
        self.kept += stats["kept"]
        self.rejected.update(stats["rejected"])
        self.tokens += stats["tokens"]
        self.kept_tokens += stats["keptTokens"]
        self.verdicts.update(stats.get("verdicts", {}))
        self.gen_seconds += stats["genSeconds"]

    def metrics(self, total_prompts: int) -> dict:
        return {"promptsDone": self.prompts, "promptsTotal": total_prompts, "samplesGenerated": self.generated,
                "samplesKept": self.kept, "samplesRejected": dict(sorted(self.rejected.items())),
                "tokensGenerated": self.tokens,
                "tokensPerSecond": round(self.tokens / self.gen_seconds, 2) if self.gen_seconds else 0.0}


class TeacherGenRun:
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
        self.prompts = prompts
        self.by_shard: dict[int, list[tuple[str, dict]]] = {s: [] for s in range(spec.shards)}
        for pid, record in prompts:
            self.by_shard[shard_of(pid, spec.shards)].append((pid, record))
        self.work = ctx.output_dir.parent / f"{ctx.output_dir.name}.work"
        self._prepare_work_dir()
        self.totals = Totals()
        self.engine: TextEngine | None = None
        self.started = time.time()

    # ---- work dir ---------------------------------------------------------------------------------------
    def _prepare_work_dir(self) -> None:
        fp = fingerprint(self.spec, self.model_uri, self.prompts)
        marker = self.work / "spec.json"
        if marker.exists():
            try:
                same = json.loads(marker.read_text()).get("sha256") == fp["sha256"]
            except ValueError:
                same = False
            if not same:  # a different spec or prompt set: earlier shards are not this run's samples
                shutil.rmtree(self.work)
        if not marker.exists():
            write_json_atomic(marker, fp)

    def shard_store(self, shard: int) -> ShardStore:
        return ShardStore(self.work / f"shard-{shard:05d}")

    def my_shards(self) -> list[int]:
        index = os.environ.get(WORKER_INDEX_ENV)
        if index is None:
            return list(range(self.spec.shards))
        try:
            workers = int(os.environ.get(WORKERS_ENV, self.spec.shards))
            i = int(index)
        except ValueError:
            raise InvalidInput(f"${WORKER_INDEX_ENV}/${WORKERS_ENV}: not integers") from None
        return list(range(i, self.spec.shards, max(1, workers)))

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
        spec = self.spec
        users = [render(spec.template, record, pid) for pid, record in batch]
        conversations = [[{"role": "user", "content": u}] for u in users]
        sampling = spec.sampling
        engine = self._engine()  # opened lazily (a rerun with nothing to do never loads the model), not timed
        started = time.time()
        outputs = engine.generate(conversations, sampling, n=sampling.samples_per_prompt,
                                          seeds=[prompt_seed(sampling.seed, pid) for pid, _ in batch])
        gen_seconds = time.time() - started

        def one(i: int):
            pid, record = batch[i]
            return decide(outputs[i], select=spec.select, filters=spec.filters, verify_kind=spec.verify.kind,
                          verify=self._verify(record))

        if spec.verify.kind == "code" and len(batch) > 1:  # sandbox runs wait on processes: overlap them
            with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
                decisions = list(pool.map(one, range(len(batch))))
        else:  # math-verify's timeouts need the main thread
            decisions = [one(i) for i in range(len(batch))]
        records, rejected, verdicts = [], Counter(), Counter()
        tokens = kept_tokens = 0
        for (pid, record), user, prompt_decisions in zip(batch, users, decisions):
            for d in prompt_decisions:
                tokens += d.completion.num_tokens
                if d.verdict is not None:
                    verdicts[d.verdict.reason] += 1
                if d.rejected:
                    rejected[d.rejected] += 1
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
        store.commit([pid for pid, _ in batch], records, stats)
        self.totals.add(stats)
        self._report()

    def _report(self, message: str = "generating", force: bool = False) -> None:
        total = len(self.prompts)
        self.ctx.progress.update(self.totals.prompts / total if total else 1.0,
                                 f"{message}: {self.totals.prompts}/{total} prompts", force=force,
                                 **self.totals.metrics(total))

    def run_shard(self, shard: int) -> None:
        store = self.shard_store(shard)
        prompts = self.by_shard[shard]
        if store.complete:
            return
        done = store.done_prompts
        todo = [p for p in prompts if p[0] not in done]
        size = self.spec.batch_size
        for start in range(0, len(todo), size):
            self.run_batch(store, todo[start:start + size])
        store.mark_complete({"shard": shard, "prompts": len(prompts)})

    # ---- publish ----------------------------------------------------------------------------------------
    def all_complete(self) -> bool:
        return all(self.shard_store(s).complete for s in range(self.spec.shards))

    def wait_for_other_shards(self) -> None:
        limit = float(os.environ.get(WAIT_ENV, 86400))
        waited = 0.0
        while not self.all_complete():
            if waited >= limit:
                raise Retryable(f"shards still running after {limit:.0f} s; retry to resume")
            self._report("waiting for other shards")
            time.sleep(5)
            waited += 5

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
        metrics = totals.metrics(len(self.prompts))
        spec = self.spec
        manifest = {
            "kind": "TeacherGen", "format": "chat-jsonl", "dataset": DATASET_FILE,
            "counts": {"prompts": len(self.prompts), "promptsDone": totals.prompts, "samplesGenerated":
                       totals.generated, "samplesKept": totals.kept, "samplesRejected": sum(totals.rejected.values()),
                       "promptsWithSamples": len({r["promptId"] for r in records}), "shards": spec.shards},
            "acceptance": {"keptFraction": round(totals.kept / totals.generated, 6) if totals.generated else 0.0,
                           "rejectedByReason": dict(sorted(totals.rejected.items())),
                           "verdicts": dict(sorted(totals.verdicts.items()))},
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
            "specSha256": fingerprint(spec, self.model_uri, self.prompts)["sha256"],
        }
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
    """The stage. ``engine``: an already open engine to use (benchmarks, tests); it is left open."""
    job = TeacherGenRun(ctx)
    job.engine = engine
    try:
        for shard in range(job.spec.shards):  # count work committed by earlier attempts and other workers
            for commit in job.shard_store(shard).commits:
                job.totals.add(commit["stats"])
        job._report("resuming", force=True)
        for shard in job.my_shards():
            job.run_shard(shard)
    finally:
        if engine is None:
            job.close()
    job.wait_for_other_shards()
    if read_manifest(ctx.output_dir) is not None and _published_sha(ctx.output_dir) == fingerprint(
            job.spec, job.model_uri, job.prompts)["sha256"] and os.environ.get(WORKER_INDEX_ENV) is not None:
        metrics = job.totals.metrics(len(job.prompts))  # another worker already published the same dataset
    else:
        metrics = job.publish()
    ctx.progress.update(1.0, "published", force=True, **metrics)
    return metrics


def _published_sha(folder: Path) -> str | None:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text()).get("specSha256")
    except (OSError, ValueError):
        return None
