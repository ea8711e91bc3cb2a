"""Benchmark the TeacherGen stage against a raw ``vllm.LLM.generate`` call on the same prompts and sampling.

    .venv/bin/python bench/teachergen.py [--model DIR] [--prompts 256] [--n 4] [--max-tokens 128] [--repeats 3]
        [--tail 4] [--tail-tokens 768] [--tail-only] [--smoke]

One vLLM engine is started once (startup is the same for both and excluded). Each repeat times:
  raw       tokenize with the chat template + ``llm.generate(prompts, SamplingParams(...))`` in one call;
  stage     the TeacherGen stage end to end in-process (load prompts, template, generate, select, commit
            with fsync, publish data.jsonl + manifest atomically) with verification off, and again with math
            verification on. ``stream``: the default path (a window of prompts in the engine, each committed as
            it finishes); ``batch``: the old path (one generate call per batchSize prompts, all prompts or 64).
  long tail the same prompts, but ``--tail`` of them may write ``--tail-tokens`` tokens instead of
            ``--max-tokens`` (R1 traces: a few answers far longer than the rest), stream vs batch=64: the batch
            path waits for each batch's slowest prompt with the engine nearly empty, the stream refills it.
            (The stage's sampling has one maxTokens; the bench raises it for those prompts' requests only, and
            sets ignore_eos on them so a tiny random model really writes them out.) ``--tail-only``: raw and
            this case only.
Prints median seconds, generated tokens/s and overhead ratios stage / raw (goal: <= 1.05 with verification
off), and the long-tail wall-time ratio stream / batch=64 measured in the same run.
Without --model a tiny Qwen2 model is built (branchmerge.trainer.tiny) in a temp folder.
--smoke: the smallest sizes and one repeat (every variant still runs; about a minute with the engine's start-up),
so tests/test_bench_smoke.py notices when the bench stops running; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

for _key, _value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

from branchmerge.api.common import Engine  # noqa: E402
from branchmerge.api.teachergen import TINYR1_MATH_TEMPLATE  # noqa: E402
from branchmerge.api.validation import parse_resource  # noqa: E402
from branchmerge.trainer.engine import open_engine, vllm_engine  # noqa: E402
from branchmerge.trainer.engine.chat import prompt_token_ids  # noqa: E402
from branchmerge.trainer.progress import Progress  # noqa: E402
from branchmerge.trainer.stage import StageContext  # noqa: E402
from branchmerge.trainer.teachergen import stage as teachergen  # noqa: E402
from branchmerge.trainer.teachergen.prompts import assign_ids, load_records, render  # noqa: E402


def write_prompts(path: Path, count: int) -> None:
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"problem": f"A box holds {i} apples and {i + 3} more are added. How many apples "
                                           f"are in the box?", "answer": str(2 * i + 3)}) + "\n")


def stage_doc(model: Path, prompts: Path, out: Path, args, verify: bool, batch: int) -> dict:
    spec = {"teacher": {"model": {"uri": model.as_uri()}, "engine": ENGINE},
            "prompts": {"dataset": {"uri": prompts.as_uri()}}, "template": TINYR1_MATH_TEMPLATE,
            "sampling": {"samplesPerPrompt": args.n, "temperature": 0.6, "topP": 0.95,
                         "maxTokens": args.max_tokens, "seed": 0},
            "filters": {"dedup": False}, "batchSize": batch, "output": {"uri": out.as_uri()}}
    if verify:
        spec["verify"] = {"kind": "math", "answerField": "answer"}
    return {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "TeacherGen", "metadata": {"name": "bench"},
            "spec": spec}


ENGINE = {"name": "vllm", "dtype": "float32", "enforceEager": True, "maxModelLen": 1024}


def time_raw(engine, prompts_file: Path, args) -> tuple[float, int]:
    from vllm import SamplingParams

    started = time.perf_counter()
    pairs = assign_ids(load_records(prompts_file), None)
    prompts, params = [], []
    for pid, record in pairs:
        conv = [{"role": "user", "content": render(TINYR1_MATH_TEMPLATE, record)}]
        prompts.append({"prompt_token_ids": prompt_token_ids(engine.tokenizer, conv)})
        params.append(SamplingParams(n=args.n, temperature=0.6, top_p=0.95, max_tokens=args.max_tokens,
                                     seed=teachergen.prompt_seed(0, pid)))
    outputs = engine.llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return elapsed, sum(len(o.token_ids) for out in outputs for o in out.outputs)


@contextlib.contextmanager
def long_tail(prompts_file: Path, args):
    """``--tail`` prompts (every len/tail-th) get ``--tail-tokens`` as max_tokens: the engine builds its
    SamplingParams with ``vllm_engine.sampling_params`` on both paths, keyed here by the prompt's seed."""
    pairs = assign_ids(load_records(prompts_file), None)
    step = max(1, len(pairs) // max(1, args.tail))
    long_seeds = {teachergen.prompt_seed(0, pid) for pid, _ in pairs[::step][:args.tail]}
    plain = vllm_engine.sampling_params

    def params(sampling, n, seed):
        if seed not in long_seeds:
            return plain(sampling, n, seed)
        long = plain(sampling.model_copy(update={"max_tokens": args.tail_tokens}), n, seed)
        long.ignore_eos = True  # a tiny random model stops early at random: make the long answers long
        return long

    vllm_engine.sampling_params = params
    try:
        yield
    finally:
        vllm_engine.sampling_params = plain


def time_stage(engine, doc: dict, out: Path, streaming: bool = True) -> tuple[float, int, float]:
    """(wall seconds, tokens, seconds not spent waiting on the engine: what the stage adds)."""
    work = out.parent / f"{out.name}.work"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    resource = parse_resource(doc)
    ctx = StageContext(resource, doc["spec"]["output"]["uri"], out, Progress(enabled=False))
    teachergen.TeacherGenSession.streaming = streaming
    try:
        metrics = teachergen.run(ctx, engine=engine)
    finally:
        teachergen.TeacherGenSession.streaming = True
    wall = time.perf_counter() - started
    generating = sum(json.loads(line)["stats"]["genSeconds"] for commits in work.rglob("commits.jsonl")
                     for line in commits.read_text().splitlines())
    return wall, metrics["tokensGenerated"], wall - generating


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tail", type=int, default=4, help="prompts with a long answer in the long-tail case")
    parser.add_argument("--tail-tokens", type=int, default=768, help="their max_tokens (within maxModelLen 1024)")
    parser.add_argument("--tail-only", action="store_true", help="time raw and the long-tail case only")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, one repeat: does the bench still run")
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.n, args.max_tokens, args.repeats, args.tail, args.tail_tokens = 4, 2, 8, 1, 1, 16
    work = Path(tempfile.mkdtemp(prefix="bm-bench-teachergen-"))
    try:
        model = args.model
        if model is None:
            from branchmerge.trainer.tiny import build_tiny_model

            model = build_tiny_model(work / "tiny")
        prompts = work / "prompts.jsonl"
        write_prompts(prompts, args.prompts)
        engine = open_engine(Engine.model_validate(ENGINE), model)
        try:
            time_raw(engine, prompts, args)  # warm-up
            # name -> (verify, batchSize, streaming, long tail); None: the raw call
            variants = {"raw": None,
                        "stage stream verify=off": (False, 64, True, False),
                        "stage batch verify=off batch=all": (False, args.prompts, False, False),
                        "stage batch verify=off batch=64": (False, 64, False, False),
                        "stage stream verify=math": (True, 64, True, False),
                        "stage batch verify=math batch=all": (True, args.prompts, False, False),
                        "long tail: stage stream": (False, 64, True, True),
                        "long tail: stage batch=64": (False, 64, False, True)}
            if args.tail_only:
                variants = {k: v for k, v in variants.items() if v is None or k.startswith("long tail")}
            times: dict[str, list[float]] = {k: [] for k in variants}
            added: dict[str, list[float]] = {k: [] for k in variants}
            tokens: dict[str, int] = {}
            for _ in range(args.repeats):  # interleaved so machine load drifts hit every variant alike
                for name, variant in variants.items():
                    if variant is None:
                        t, tok = time_raw(engine, prompts, args)
                        extra = 0.0
                    else:
                        verify, batch, streaming, tail = variant
                        out = work / "out"
                        doc = stage_doc(model, prompts, out, args, verify, batch)
                        with long_tail(prompts, args) if tail else contextlib.nullcontext():
                            t, tok, extra = time_stage(engine, doc, out, streaming)
                    added[name].append(extra)
                    times[name].append(t)
                    tokens[name] = tok
        finally:
            engine.close()
        raw = statistics.median(times["raw"])
        print(f"\n{args.prompts} prompts x n={args.n}, max_tokens={args.max_tokens}, {args.repeats} repeats "
              f"(median), model {model}")
        print("ratio = stage wall / raw wall (noisy on a shared machine); added = stage seconds not spent waiting "
              "on the engine / raw wall (what the stage itself costs; the stream verifies while the engine runs)")
        print(f"{'variant':36s} {'seconds':>9s} {'tokens':>8s} {'tok/s':>9s} {'ratio':>7s} {'added':>7s}")
        for name in variants:
            med = statistics.median(times[name])
            extra = statistics.median(added[name]) / raw
            print(f"{name:36s} {med:9.3f} {tokens[name]:8d} {tokens[name] / med:9.1f} {med / raw:7.3f} "
                  f"{extra:7.3f}")
        plain = [k for k in variants if not k.startswith("long tail")]
        same = len({tokens[k] for k in plain}) <= 1
        print(f"same generated token count in every variant without the long tail: {same}; with it: "
              f"{tokens['long tail: stage stream'] == tokens['long tail: stage batch=64']}")
        stream, batch = (statistics.median(times[f"long tail: stage {k}"]) for k in ("stream", "batch=64"))
        print(f"long tail ({args.tail} of {args.prompts} prompts up to {args.tail_tokens} tokens): stream / batch=64 "
              f"wall time = {stream / batch:.3f} ({stream:.2f} s vs {batch:.2f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
