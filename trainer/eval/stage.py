"""The Eval stage: generate k samples per question with the shared engine, grade them with the shared graders,
aggregate pass@1 / stderr / pass@k / output length per benchmark, and publish the result files atomically:

    results.json             scores, settings and timings (what ``branchmerge compare`` reads)
    results.md               the same as a table for people
    records/<benchmark>.jsonl  per question: prompt(s), reference, every sample with its verdict

The returned metrics (status.metrics) hold ``score`` (mean pass@1 over benchmarks: the printer column) and
``benchmarks: {name: {pass1, stderr, passAtK, n, meanTokens, p95Tokens, truncated}}``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...api.eval import Benchmark
from ..errors import InvalidInput
from ..publish import atomic_folder, write_json_atomic
from .aggregate import SampleOutcome, overall_score, summarize
from .data import DataError, load_records, question_id
from .questions import Question, QuestionError, build_question
from .report import RESULTS_JSON, RESULTS_MD, results_markdown
from .scoring import grade_all

GENERATION_SHARE = 0.85  # of a benchmark's progress bar; grading takes the rest
STATUS_KEYS = ("pass1", "stderr", "passAtK", "n", "samples", "meanTokens", "p95Tokens", "truncated")


@dataclass
class BenchmarkRun:
    spec: Benchmark
    index: int
    questions: list[Question]

    @property
    def requests(self) -> int:
        return sum(len(q.prompts) for q in self.questions)


def load_benchmark(ctx, index: int, benchmark: Benchmark) -> BenchmarkRun:
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
    return BenchmarkRun(benchmark, index, questions)


def conversation(benchmark: Benchmark, prompt: str) -> list[dict]:
    messages = [{"role": "system", "content": benchmark.system_prompt}] if benchmark.system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def generate(engine, run: BenchmarkRun, sampling, report) -> list[list[Any]]:
    """Per question, its k completions in sample order."""
    spec = run.spec
    conversations = [conversation(spec, p) for q in run.questions for p in q.prompts]
    n = 1 if spec.kind == "mcq" and spec.shuffle_choices else spec.samples
    outputs = engine.generate(conversations, sampling, n=n,
                              on_progress=lambda done, total: report(GENERATION_SHARE * done / max(total, 1)))
    per_question, cursor = [], 0
    for q in run.questions:
        chunk = outputs[cursor: cursor + len(q.prompts)]
        cursor += len(q.prompts)
        per_question.append([c for completions in chunk for c in completions])
    return per_question


def sample_record(index: int, completion, verdict, graded: dict, order: list[int] | None) -> dict:
    record = {"index": index, "text": completion.text, "numTokens": completion.num_tokens,
              "finishReason": completion.finish_reason, "truncated": completion.truncated,
              "correct": bool(verdict.correct), "reason": verdict.reason, "extracted": verdict.extracted}
    if order is not None:
        record.update(order=order, reference=graded["answer"])
    return record


def question_record(run: BenchmarkRun, q: Question, samples: list[dict]) -> dict:
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
    record.update(correct=sum(s["correct"] for s in samples), samples=samples)
    return record


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def run(ctx) -> dict:
    from ..engine import open_engine

    spec = ctx.spec
    started = time.time()
    model_path = ctx.input_path(spec.model, "spec.model") if spec.model is not None else None
    runs = [load_benchmark(ctx, i, b) for i, b in enumerate(spec.benchmarks)]
    total_requests = sum(r.requests for r in runs)
    ctx.progress.update(0.0, f"loading the model ({spec.engine.name})", force=True,
                        questions=sum(len(r.questions) for r in runs), benchmarks=len(runs))

    summaries: dict[str, dict] = {}
    records: dict[str, list[dict]] = {}
    timing = {"load": 0.0, "generation": 0.0, "grading": 0.0}
    generated_tokens = 0
    done_requests = 0
    t0 = time.time()
    with open_engine(spec.engine, model_path) as engine:
        timing["load"] = time.time() - t0
        for r in runs:
            name = r.spec.name
            weight = r.requests / max(total_requests, 1)
            base = done_requests / max(total_requests, 1)

            def report(fraction: float, _name=name, _base=base, _weight=weight, **metrics) -> None:
                ctx.progress.update(_base + _weight * fraction, f"{_name}: {fraction:.0%}", **metrics)

            ctx.progress.update(base, f"{name}: generating {r.requests} prompt(s) x "
                                      f"{1 if len(r.questions[0].prompts) > 1 else r.spec.samples}", force=True)
            t0 = time.time()
            completions = generate(engine, r, spec.sampling, report)
            timing["generation"] += time.time() - t0
            t0 = time.time()
            verdicts = grade_all(r.spec.kind, r.questions, completions, spec.code_timeout_seconds,
                                 on_progress=lambda done, total: report(
                                     GENERATION_SHARE + (1 - GENERATION_SHARE) * done / max(total, 1)))
            timing["grading"] += time.time() - t0
            outcomes, rows = [], []
            for q, comps, verds in zip(r.questions, completions, verdicts):
                samples = []
                for i, (c, v) in enumerate(zip(comps, verds)):
                    graded = q.graded[i] if len(q.graded) > 1 else q.graded[0]
                    samples.append(sample_record(i, c, v, graded, q.orders[i] if q.orders else None))
                    generated_tokens += c.num_tokens
                outcomes.append([SampleOutcome(bool(v.correct), c.num_tokens, c.truncated)
                                 for c, v in zip(comps, verds)])
                rows.append(question_record(r, q, samples))
            summaries[name] = {"kind": r.spec.kind, **summarize(outcomes)}
            records[name] = rows
            done_requests += r.requests
            ctx.progress.update(done_requests / max(total_requests, 1),
                                f"{name}: pass@1 {summaries[name]['pass1']:.3f}", force=True,
                                **{f"pass1/{name}": round(summaries[name]["pass1"], 6)})

    score = overall_score(summaries.values())
    timing["total"] = time.time() - started
    results = _rounded({
        "name": ctx.resource.name,
        "model": spec.model.uri if spec.model is not None else (spec.engine.endpoint.model if spec.engine.endpoint
                                                                 else None),
        "engine": spec.engine.wire(),
        "sampling": spec.sampling.wire(),
        "score": score,
        "benchmarks": {name: {**s, "dataset": next(b.dataset.uri for b in spec.benchmarks if b.name == name)}
                       for name, s in summaries.items()},
        "generatedTokens": generated_tokens,
        "timing": timing,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    with atomic_folder(ctx.output_dir) as out:
        write_json_atomic(out / RESULTS_JSON, results)
        (out / RESULTS_MD).write_text(results_markdown(results))
        folder = out / "records"
        folder.mkdir()
        for name, rows in records.items():
            with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    ctx.progress.update(1.0, f"score {score:.3f}", force=True)
    return _rounded({
        "score": score,
        "benchmarks": {name: {k: s[k] for k in STATUS_KEYS} for name, s in summaries.items()},
        "questions": sum(s["n"] for s in summaries.values()),
        "generatedTokens": generated_tokens,
        "generationSeconds": timing["generation"],
        "gradingSeconds": timing["grading"],
    })
