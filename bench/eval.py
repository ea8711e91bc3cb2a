"""Eval stage overhead and sandboxed code-grading throughput, on the tiny local model (CPU).

1. Raw vLLM: the exact prompts the stage sends (same chat template, SamplingParams and per-request seeds)
   through ``vllm.LLM.generate``; only the generate call is timed (cold, like the stage's single call). Then, on
   the same LLM instance, warm raw calls alternate with the stage's own generate path; best of --repeats each.
2. The stage: ``branchmerge stage eval`` on the same benchmarks in a subprocess; its wall time, and the split it
   records (data + prompts, model load, generation, grading, records + summaries, engine shutdown).
   Ratios printed: stage generation / raw generation, and (stage wall - model load) / raw generation.
3. Code grading: P correct programs x T stdin tests through the shared sandbox, one at a time (baseline) and
   through the stage's thread pool; tests/s for both.

    .venv/bin/python bench/eval.py [--samples 4] [--max-tokens 256] [--programs 24] [--tests 4] [--smoke]

--smoke: the smallest sizes (2 questions per benchmark, 1 sample, 8 tokens, 2 programs x 1 test) and one
repeat; every part still runs (two engine start-ups: about a minute), so tests/test_bench_smoke.py notices
when the bench stops running. Its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for key, value in {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)
sys.path.insert(0, str(REPO))  # the synthetic benchmarks live with the Eval tests (tests/trainer/eval)

ENGINE = {"name": "vllm", "dtype": "float32", "enforceEager": True, "maxModelLen": 1024}


def benchmark_runs(bench: list[dict], seed: int):
    """The stage's questions for these benchmarks, built by the stage's own code."""
    from branchmerge.api.eval import Benchmark
    from branchmerge.api.uris import local_path
    from branchmerge.trainer.eval.data import load_records, question_id
    from branchmerge.trainer.eval.questions import build_question
    from branchmerge.trainer.eval.stage import LoadedBenchmark

    runs = []
    for i, doc in enumerate(bench):
        b = Benchmark.model_validate(doc)
        records = load_records(local_path(b.dataset.uri), b.limit, b.fields.id)
        runs.append(LoadedBenchmark(b, i, [build_question(r, question_id(r, j, b.fields.id), b, seed)
                                        for j, r in enumerate(records)]))
    return runs


def raw_generation_seconds(model: Path, bench: list[dict], sampling, repeats: int,
                           tmp: Path) -> tuple[float, int, float]:
    """(raw generate seconds, raw tokens, warm ratio of the stage's generate path to raw) on ONE vLLM instance.

    The first raw call is the cold baseline (as in a fresh stage). Then raw calls and the stage's own
    generation (``generate_share``: chunks through the engine layer -- chat template, seeds, progress
    forwarding -- each committed to a work folder) alternate ``repeats`` times and the best of each is kept,
    which cancels most of the noise of a shared machine.
    """
    from vllm import LLM

    from branchmerge.api.common import Engine
    from branchmerge.trainer.engine.base import TextEngine
    from branchmerge.trainer.engine.chat import load_tokenizer, prompt_token_ids
    from branchmerge.trainer.engine.vllm_engine import VllmEngine, llm_kwargs, sampling_params
    from branchmerge.trainer.eval.stage import generate_share, sample_requests
    from branchmerge.trainer.eval.work import EvalWork

    engine = Engine.model_validate(ENGINE)
    tokenizer = load_tokenizer(model)
    runs = benchmark_runs(bench, sampling.seed)
    requests = sample_requests(runs, sampling.seed)  # exactly the stage's requests
    prompts = [{"prompt_token_ids": prompt_token_ids(tokenizer, r.conversation)} for r in requests]
    params = [sampling_params(sampling, 1, r.seed) for r in requests]
    llm = LLM(**llm_kwargs(engine, model))

    def raw() -> tuple[float, int]:
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - started, sum(len(o.token_ids) for out in outputs for o in out.outputs)

    wrapped = VllmEngine.__new__(VllmEngine)  # the stage's engine class around the SAME LLM instance
    TextEngine.__init__(wrapped, None)
    wrapped.tokenizer, wrapped.llm = tokenizer, llm
    wrapped.close = lambda: None  # generate_share closes its engine: keep this one for the next repeat
    calls = iter(range(10 ** 6))

    def staged() -> float:
        work = EvalWork(tmp / f"work-{next(calls)}", 0)  # a fresh work folder: nothing committed yet
        started = time.perf_counter()
        generate_share(lambda: wrapped, work, requests, list(range(len(requests))), sampling,
                       lambda done: None, {})
        return time.perf_counter() - started

    cold, tokens = raw()
    raw_best, stage_best = float("inf"), float("inf")
    for _ in range(repeats):
        raw_best = min(raw_best, raw()[0])
        stage_best = min(stage_best, staged())
    print(f"warm, best of {repeats}: raw vllm generate {raw_best:.2f} s, the stage's generate path "
          f"{stage_best:.2f} s, ratio {stage_best / raw_best:.3f}")
    llm.llm_engine.engine_core.shutdown()
    del llm
    return cold, tokens, stage_best / raw_best


def stage_run(tmp: Path, model: Path, bench: list[dict], max_tokens: int) -> tuple[float, dict]:
    from tests.trainer.eval.eval_synthetic import write_manifest

    spec = write_manifest(tmp / "eval.yaml", "bench", model, tmp / "out", bench, ENGINE, max_tokens=max_tokens)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "branchmerge.cli", "stage", "eval", "--spec", str(spec),
                           "--result", str(tmp / "result.json")], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"stage failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads((tmp / "out" / "results.json").read_text())


def code_grading(programs: int, tests: int) -> tuple[float, float]:
    """tests/s one at a time, and through the stage's pool."""
    from branchmerge.api.eval import Benchmark
    from branchmerge.trainer.engine import Completion
    from branchmerge.trainer.eval.questions import build_question
    from branchmerge.trainer.eval.scoring import grade_all
    from branchmerge.trainer.grading import grade

    cases = [{"input": f"{i} {i + 1}\n", "output": f"{2 * i + 1}\n", "testtype": "stdin"} for i in range(tests)]
    bench = Benchmark.model_validate({"name": "c", "kind": "code", "samples": programs,
                                      "dataset": {"uri": "file:///unused.jsonl"}})
    q = build_question({"id": "sum", "prompt": "sum", "tests": cases}, "sum", bench, 0)
    answer = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    comps = [[Completion(answer, None, 10, "stop") for _ in range(programs)]]
    started = time.perf_counter()
    serial = [grade("code", c.text, q.record, timeout_seconds=10) for c in comps[0]]
    serial_rate = programs * tests / (time.perf_counter() - started)
    started = time.perf_counter()
    pooled = grade_all("code", [q], comps, code_timeout=10)[0]
    pooled_rate = programs * tests / (time.perf_counter() - started)
    assert all(v.correct for v in serial + pooled), "the benchmark programs must pass"
    return serial_rate, pooled_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--programs", type=int, default=24)
    parser.add_argument("--tests", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="warm raw/stage generate pairs on one engine")
    parser.add_argument("--limit", type=int, default=None, help="questions per benchmark (default: all)")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, one repeat: does the bench still run")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.max_tokens, args.programs, args.tests, args.repeats, args.limit = 1, 8, 2, 1, 1, 2

    from branchmerge.api.common import Sampling
    from branchmerge.trainer.tiny import build_tiny_model
    from tests.trainer.eval.eval_synthetic import benchmarks, copy_data

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model")
        bench = benchmarks(copy_data(tmp / "data"), samples=args.samples, limit=args.limit)
        sampling = Sampling(temperature=0.6, top_p=0.95, max_tokens=args.max_tokens, seed=0)
        raw_s, raw_tokens, warm_ratio = raw_generation_seconds(model, bench, sampling, args.repeats, tmp)
        wall, results = stage_run(tmp, model, bench, args.max_tokens)
    t = results["timing"]
    rest = t["total"] - t["load"] - t["generation"] - t["grading"] - t["prepare"] - t["shutdown"]
    print(f"prompts: {sum(b['n'] for b in results['benchmarks'].values())} questions x {args.samples} samples, "
          f"max_tokens {args.max_tokens}; raw tokens {raw_tokens}, stage tokens {results['generatedTokens']}")
    print(f"raw vllm generate:          {raw_s:8.2f} s")
    print(f"stage generation:           {t['generation']:8.2f} s   ratio vs raw {t['generation'] / raw_s:5.2f}"
          f"   (warm, same engine: {warm_ratio:.3f})")
    print(f"stage grading:              {t['grading']:8.2f} s")
    print(f"stage data + prompts:       {t['prepare']:8.2f} s")
    print(f"stage records + summaries:  {rest:8.2f} s")
    print(f"stage engine shutdown:      {t['shutdown']:8.2f} s")
    print(f"stage model load:           {t['load']:8.2f} s")
    print(f"stage wall (subprocess):    {wall:8.2f} s   (wall - load) / raw {(wall - t['load']) / raw_s:5.2f}")
    serial, pooled = code_grading(args.programs, args.tests)
    print(f"code grading, one at a time:  {serial:7.1f} tests/s")
    print(f"code grading, stage pool:     {pooled:7.1f} tests/s   ratio {pooled / serial:4.2f}  "
          f"({os.cpu_count()} cores)")


if __name__ == "__main__":  # vLLM spawns workers that re-import this module
    main()
