"""The Eval stage: generate k samples per question with the shared engine, grade them with the shared graders,
aggregate pass@1 / stderr / pass@k / output length per benchmark, and publish the result files atomically:

    results.json             scores, settings and timings (what ``branchmerge compare`` reads)
    results.md               the same as a table for people
    records/<benchmark>.jsonl  per question: prompt(s), reference, every sample with its verdict

The returned metrics (status.metrics) hold ``score`` (mean pass@1 over benchmarks: the printer column) and
``benchmarks: {name: {pass1, stderr, passAtK, n, meanTokens, p95Tokens, truncated}}``. A sample the engine
rejected (a request the endpoint refused, a prompt longer than the context) counts as wrong; results.json
gives their number per benchmark (``rejected``, reasons ``engine:<code>``) and the records their message.

Workers and resuming (:mod:`.work`, the TeacherGen design of ``trainer/workers.py``): worker ``i`` of ``W``
(``$RANK``/``$WORLD_SIZE``; on Kubernetes the pods of an Indexed Job of ``spec.resources.nodes``) sends a
disjoint share of the requests in chunks and commits each answered chunk under ``<output>.work/``; a retried
pod resumes from the committed chunks, a changed spec starts over. ``engine.dataParallelSize`` is not a knob
of its own: the workers ARE the engine replicas (one engine of ``tensorParallelSize`` GPUs per pod; several
engines in one pod are not started), so set ``spec.resources.nodes``. Each worker closes its engine as soon as
its share is committed (workers other than 0 then exit, releasing their GPUs); worker 0 waits for every
share (giving up retryably after ``$BRANCHMERGE_SHARD_WAIT_SECONDS`` without progress), then grades
everything with the engine closed -- code tests run in the sandbox pool with the GPU memory freed -- and
publishes. One grader sees every sample of a question, so the scores are those of a single-process run.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ...api.eval import Benchmark
from ...api.outputs import write_json_atomic
from ...api.timefmt import format_time
from ..engine import open_engine, request_seed  # light: backends are imported when opened
from ..errors import InvalidInput
from ..grading import graders_digest
from ..publish import atomic_folder
from ..workers import (DEFAULT_POLL_SECONDS, DEFAULT_WAIT_SECONDS, POLL_ENV, WAIT_ENV, check_rank, env_seconds,
                       prepare_work_dir, ranges, wait_until_done, work_folder)
from .aggregate import SampleOutcome, overall_score, summarize
from .data import DataError, load_records, question_id
from .questions import Question, QuestionError, build_question, grading_material
from .report import RESULTS_JSON, RESULTS_MD, results_markdown
from .scoring import grade_all
from .work import EvalWork, Request, assigned, chunk_size, fingerprint

GENERATION_SHARE = 0.85  # of the progress bar; grading takes the rest
STATUS_KEYS = ("pass1", "stderr", "passAtK", "n", "samples", "meanTokens", "p95Tokens", "truncated")


@dataclass
class LoadedBenchmark:
    spec: Benchmark
    index: int
    questions: list[Question]


def load_benchmark(ctx, index: int, benchmark: Benchmark) -> LoadedBenchmark:
    """Read and check a benchmark's data before any model is loaded (bad data fails fast, exit 2)."""
    where = f"spec.benchmarks[{index}] ({benchmark.name})"
    path = ctx.input_path(benchmark.dataset, f"{where}.dataset")
    try:
        records = load_records(path, benchmark.limit, benchmark.fields.id)
    except DataError as err:
        raise InvalidInput(f"{where}.dataset: {err}") from None
    questions = []
    for i, record in enumerate(records):
        qid = question_id(record, i, benchmark.fields.id)
        try:
            questions.append(build_question(record, qid, benchmark, ctx.spec.sampling.seed))
        except QuestionError as err:
            raise InvalidInput(f"{where}: question {qid!r}: {err}") from None
    return LoadedBenchmark(benchmark, index, questions)


def conversation(benchmark: Benchmark, prompt: str) -> list[dict]:
    messages = [{"role": "system", "content": benchmark.system_prompt}] if benchmark.system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def sample_requests(runs: list[LoadedBenchmark], base_seed: int) -> list[Request]:
    """Every sample of every benchmark as its own request (n = 1), in run/question/sample order.

    Chunks mix benchmarks, which keeps the engine's batch full (separate calls per benchmark ran ~1.9x
    slower on the tiny model: each call decodes to its longest answer). Sample j of a prompt gets seed
    request_seed + j, so samples differ even when shuffled options repeat an order, and the draw does not
    depend on batching, chunking or the worker.
    """
    requests = []
    for r in runs:
        for q in r.questions:
            for j in range(r.spec.samples):
                conv = conversation(r.spec, q.prompts[j] if len(q.prompts) > 1 else q.prompts[0])
                requests.append(Request(len(requests), r.spec.name, q.id, j, conv,
                                        (request_seed(base_seed, conv) + j) & 0x7FFFFFFF))
    return requests


def generate_share(open_model, work: EvalWork, requests: list[Request], todo: list[int], sampling,
                   on_progress, timing: dict) -> None:
    """Send this worker's uncommitted requests chunk by chunk, committing each; the engine is opened only
    when there is something to send and closed before returning (grading never runs beside it)."""
    engine = None
    size = chunk_size()
    try:
        for start in range(0, len(todo), size):
            chunk = [requests[k] for k in todo[start:start + size]]
            if engine is None:
                t0 = time.time()
                engine = open_model()
                timing["load"] = time.time() - t0
            base = len(work.committed())
            t0 = time.time()
            outputs = engine.generate([r.conversation for r in chunk], sampling, n=1, seeds=[r.seed for r in chunk],
                                      on_progress=lambda done, _total, _base=base: on_progress(_base + done))
            work.commit(chunk, [completions[0] for completions in outputs], time.time() - t0)
    finally:
        if engine is not None:
            t0 = time.time()
            engine.close()
            timing["shutdown"] = time.time() - t0


def arrange(runs: list[LoadedBenchmark], requests: list[Request], answers: dict) -> list[list[list[Any]]]:
    """Per benchmark, per question, its k completions in sample order (requests are in that order)."""
    flat = iter(answers[r.index] for r in requests)
    return [[[next(flat) for _ in range(r.spec.samples)] for _ in r.questions] for r in runs]


def sample_record(index: int, completion, verdict, graded: dict, order: list[int] | None) -> dict:
    record = {"index": index, "text": completion.text, "numTokens": completion.num_tokens,
              "finishReason": completion.finish_reason, "truncated": completion.truncated,
              "correct": bool(verdict.correct), "reason": verdict.reason, "extracted": verdict.extracted}
    if order is not None:
        record.update(order=order, reference=graded["answer"])
    if completion.rejected:
        record.update(rejected=completion.rejected, error=completion.error)
    return record


def question_record(run: LoadedBenchmark, q: Question, samples: list[dict]) -> dict:
    spec = run.spec
    record: dict[str, Any] = {"id": q.id, "benchmark": spec.name, "kind": spec.kind}
    if spec.system_prompt:
        record["systemPrompt"] = spec.system_prompt
    record["prompt" if len(q.prompts) == 1 else "prompts"] = q.prompts[0] if len(q.prompts) == 1 else q.prompts
    if spec.kind == "code":
        tests = q.record.get("tests")
        record["tests"] = len(tests) if isinstance(tests, (list, dict)) else 1
    else:
        record["reference"] = q.record.get("answer")
    # what the grader read, so `branchmerge rescore` can re-grade these samples without the dataset
    record["grading"] = grading_material(spec.kind, q.record)
    record.update(correct=sum(s["correct"] for s in samples), samples=samples)
    return record


def wait_for_workers(ctx, work: EvalWork, total: int, world: int, wait_seconds: float, poll_seconds: float) -> None:
    """Worker 0: until every request is committed; Retryable once no worker committed for ``wait_seconds``."""
    def missing() -> list[int]:
        return sorted(set(range(total)) - work.committed())

    def on_wait(todo: list[int]) -> None:
        ctx.progress.update(GENERATION_SHARE * (total - len(todo)) / max(total, 1),
                            f"waiting for workers {ranges(sorted({k % world for k in todo}))}: "
                            f"{total - len(todo)}/{total} samples")

    def stalled(todo: list[int]) -> str:
        owners = sorted({k % world for k in todo})
        return (f"{len(todo)} of {total} samples (workers {ranges(owners)} of {world}) not committed and no "
                f"progress for {wait_seconds:.0f} s (${WAIT_ENV}); retry to resume from the committed chunks")

    wait_until_done(missing, lambda _todo: work.state(), wait_seconds, poll_seconds, on_wait, stalled)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def score_benchmark(r: LoadedBenchmark, completions: list[list[Any]], spec, report) -> tuple[dict, list[dict], int]:
    """Grade and summarise one benchmark: (summary, per-question records, generated tokens)."""
    verdicts = grade_all(r.spec.kind, r.questions, completions, spec.code_timeout_seconds,
                         on_progress=lambda done, total: report(done / max(total, 1)))
    outcomes, rows, tokens = [], [], 0
    for q, comps, verds in zip(r.questions, completions, verdicts):
        samples = []
        for i, (c, v) in enumerate(zip(comps, verds)):
            graded = q.graded[i] if len(q.graded) > 1 else q.graded[0]
            samples.append(sample_record(i, c, v, graded, q.orders[i] if q.orders else None))
            tokens += c.num_tokens
        # an ungradable sample (verdict None) counts as wrong: the data was checked before generation
        outcomes.append([SampleOutcome(bool(v.correct), c.num_tokens, c.truncated) for c, v in zip(comps, verds)])
        rows.append(question_record(r, q, samples))
    reasons = Counter(s["reason"] for row in rows for s in row["samples"])
    rejected = sum(1 for row in rows for s in row["samples"] if s.get("rejected"))
    summary = {"kind": r.spec.kind, **summarize(outcomes), "rejected": rejected,
               "reasons": dict(sorted(reasons.items()))}
    return summary, rows, tokens


def dataset_fields(benchmark: Benchmark) -> dict:
    """Where a benchmark's questions came from, in results.json: re-grading falls back to that dataset for
    what old records lack."""
    return {"dataset": benchmark.dataset.uri, "fields": benchmark.fields.wire()}


def publish(output_dir, results: dict, records: dict[str, list[dict]], extra: dict[str, list[dict]] | None = None
            ) -> None:
    """results.json, results.md, records/<benchmark>.jsonl (and ``extra`` JSONL files), atomically."""
    def write_jsonl(path, rows: list[dict]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    with atomic_folder(output_dir) as out:
        write_json_atomic(out / RESULTS_JSON, results)
        (out / RESULTS_MD).write_text(results_markdown(results))
        folder = out / "records"
        folder.mkdir()
        for name, rows in records.items():
            write_jsonl(folder / f"{name}.jsonl", rows)
        for name, rows in (extra or {}).items():
            write_jsonl(out / name, rows)


def status_metrics(summaries: dict[str, dict]) -> dict:
    return {"score": overall_score(summaries.values()),
            "benchmarks": {name: {k: s[k] for k in STATUS_KEYS} for name, s in summaries.items()},
            "questions": sum(s["n"] for s in summaries.values())}


def run(ctx) -> dict:
    spec = ctx.spec
    rank, world = int(ctx.rank), int(ctx.world_size)
    check_rank(rank, world)
    if spec.regrade is not None:  # no model, engine or GPU: the saved generations of another Eval
        from .rescore import run_regrade

        return run_regrade(ctx) if rank == 0 else {}
    started = time.time()
    model_path = ctx.input_path(spec.model, "spec.model") if spec.model is not None else None
    runs = [load_benchmark(ctx, i, b) for i, b in enumerate(spec.benchmarks)]
    requests = sample_requests(runs, spec.sampling.seed)
    total_samples = max(len(requests), 1)
    replicas = spec.engine.data_parallel_size
    if replicas > 1 and replicas != world and rank == 0:
        print(f"eval: engine.dataParallelSize is {replicas} but the run has {world} worker(s) "
              f"(spec.resources.nodes on Kubernetes): the workers are the engine replicas, one engine per worker",
              file=sys.stderr)
    wait_seconds = env_seconds(WAIT_ENV, DEFAULT_WAIT_SECONDS)
    poll_seconds = env_seconds(POLL_ENV, DEFAULT_POLL_SECONDS)
    work_dir = work_folder(ctx.output_dir)
    prepare_work_dir(work_dir, fingerprint(spec, model_path, requests), rank, wait_seconds, poll_seconds)
    work = EvalWork(work_dir, rank)
    committed = work.committed()
    todo = [k for k in assigned(len(requests), rank, world) if k not in committed]
    ctx.progress.update(GENERATION_SHARE * len(committed) / total_samples,
                        f"{len(committed)} of {len(requests)} samples committed; {len(todo)} to generate here",
                        force=True, questions=sum(len(r.questions) for r in runs), benchmarks=len(runs))

    summaries: dict[str, dict] = {}
    records: dict[str, list[dict]] = {}
    timing = {"prepare": time.time() - started, "load": 0.0, "generation": 0.0, "grading": 0.0, "shutdown": 0.0}
    t0 = time.time()

    def generated(done: int) -> None:
        ctx.progress.update(GENERATION_SHARE * done / total_samples, f"generating: {done}/{len(requests)} samples")

    generate_share(lambda: open_engine(spec.engine, model_path), work, requests, todo, spec.sampling, generated,
                   timing)
    if rank != 0:  # worker 0 waits for this share, grades and publishes
        return {"samplesGenerated": len(todo), "samplesTotal": len(requests)}
    wait_for_workers(ctx, work, len(requests), world, wait_seconds, poll_seconds)
    timing["generation"] = time.time() - t0 - timing["load"] - timing["shutdown"]
    completions = arrange(runs, requests, work.answers())

    generated_tokens = graded = 0
    t0 = time.time()
    for r, comps in zip(runs, completions):
        name, base = r.spec.name, GENERATION_SHARE + (1 - GENERATION_SHARE) * graded / total_samples
        weight = (1 - GENERATION_SHARE) * len(r.questions) * r.spec.samples / total_samples

        def report(fraction: float, _name=name, _base=base, _weight=weight) -> None:
            ctx.progress.update(_base + _weight * fraction, f"grading {_name}: {fraction:.0%}")

        summaries[name], records[name], tokens = score_benchmark(r, comps, spec, report)
        generated_tokens += tokens
        graded += len(r.questions) * r.spec.samples
        ctx.progress.update(GENERATION_SHARE + (1 - GENERATION_SHARE) * graded / total_samples,
                            f"{name}: pass@1 {summaries[name]['pass1']:.3f}", force=True,
                            **{f"pass1/{name}": round(summaries[name]["pass1"], 6)})
    timing["grading"] = time.time() - t0

    score = overall_score(summaries.values())
    timing["total"] = time.time() - started
    results = _rounded({
        "name": ctx.resource.name,
        "model": spec.model.uri if spec.model is not None else (spec.engine.endpoint.model if spec.engine.endpoint
                                                                 else None),
        "engine": spec.engine.wire(),
        "sampling": spec.sampling.wire(),
        "score": score,
        "benchmarks": {name: {**s, **dataset_fields(next(b for b in spec.benchmarks if b.name == name))}
                       for name, s in summaries.items()},
        "codeTimeoutSeconds": spec.code_timeout_seconds,
        "graders": graders_digest(),
        "generatedTokens": generated_tokens,
        "timing": timing,
        "createdAt": format_time(),
    })
    publish(ctx.output_dir, results, records)
    ctx.progress.update(1.0, f"score {score:.3f}", force=True)
    return _rounded({
        **status_metrics(summaries),
        "generatedTokens": generated_tokens,
        "generationSeconds": timing["generation"],
        "gradingSeconds": timing["grading"],
    })
