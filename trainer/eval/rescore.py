"""Re-grade an Eval's saved generations with the current graders: no model, engine or GPU.

An Eval output (``results.json``, ``records/<benchmark>.jsonl``, ``_manifest.json``) holds every sample's
text. Re-scoring rebuilds each benchmark's questions from the records (prompts, the grading material the
stage saved: reference, options, tests), turns the samples back into completions and runs them through the
Eval stage's own :func:`~.stage.score_benchmark` -- the same graders (code in the sandbox) and the same
aggregation -- so unchanged graders give identical scores and a grader fix never needs regeneration.

Records written before the grading material was saved fall back to the benchmark's dataset as the Eval
recorded it (``results.json``: ``benchmarks.<name>.dataset`` and ``fields``); the dataset must still agree
with what the records say was graded (reference, number of tests), else re-scoring refuses. Tests too big
to copy into a record are read from the dataset the same way and checked against their saved digest.

The output has the Eval layout (so ``branchmerge compare`` and a further rescore read it) plus
``changes.jsonl``: one line per sample whose verdict flipped. Its ``results.json`` says what was re-graded
(``rescore``: source folder, its digest, previous scores). The source is verified against its manifest
first and never written to; ``branchmerge rescore`` publishes under ``<source>/rescored/<UTC time>/``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from ...api.eval import Benchmark
from ...api.outputs import combined_digest, read_manifest, sha256_file
from ...api.timefmt import format_time
from ...api.uris import UnresolvableUri, local_path
from ..datasets import read_records
from ..engine.base import Completion
from ..errors import InvalidInput
from ..grading import graders_digest
from .data import DataError, load_records, question_id
from .prompts import LETTERS
from .questions import (Question, QuestionError, grading_material, graded_record, material_record,
                        tests_digest)
from .report import RESULTS_JSON, ResultsError, load_results
from .stage import LoadedBenchmark, _rounded, dataset_fields, publish, score_benchmark, status_metrics

RESCORED = "rescored"
CHANGES = "changes.jsonl"
DEFAULT_CODE_TIMEOUT = 10.0  # the EvalSpec default, for results.json files that do not record theirs


@dataclass
class Source:
    """A published Eval output, checked against its manifest."""

    folder: Path
    results: dict
    digest: str
    records: dict[str, list[dict]]


def open_source(folder: str | Path) -> Source:
    """Read and verify an Eval output folder; InvalidInput (exit 2) naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInput(f"{folder}: not a folder (expected a published Eval output)")
    files = read_manifest(folder)
    if files is None:
        raise InvalidInput(f"{folder}: not a published output (no readable _manifest.json); rescore reads the "
                           f"output folder of a finished Eval")
    if RESULTS_JSON not in files:
        raise InvalidInput(f"{folder}: not an Eval output (its manifest lists no {RESULTS_JSON})")
    try:
        results = load_results(folder)
    except ResultsError as err:
        raise InvalidInput(f"not an Eval output: {err}") from None
    records = {}
    for name, info in results["benchmarks"].items():
        rel = f"records/{name}.jsonl"
        if rel not in files:
            raise InvalidInput(f"{folder}: not an Eval output with saved generations (no {rel} for benchmark "
                               f"{name!r})")
        if info.get("kind") not in ("math", "mcq", "code", "exact"):
            raise InvalidInput(f"{folder}/{RESULTS_JSON}: benchmarks.{name}.kind: unknown kind {info.get('kind')!r}")
    # what is re-graded is what was published: a record edited since would change scores silently
    for rel in [RESULTS_JSON] + [f"records/{name}.jsonl" for name in results["benchmarks"]]:
        path = folder / rel
        if not path.is_file() or sha256_file(path) != files[rel]:
            raise InvalidInput(f"{path}: differs from the digest in {folder}/_manifest.json (changed or missing "
                               f"since it was published)")
    for name in results["benchmarks"]:
        rows = read_records(folder / "records" / f"{name}.jsonl", "")
        if not rows:
            raise InvalidInput(f"{folder}/records/{name}.jsonl: no questions")
        records[name] = rows
    return Source(folder, results, combined_digest(files), records)


class DatasetFallback:
    """The graded records of a benchmark's dataset by question id, read once when an old record needs it."""

    def __init__(self, name: str, kind: str, info: dict, override: str | Path | None = None):
        self.name, self.kind, self.info, self.override = name, kind, info, override
        self._records: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        uri = self.info.get("dataset")
        where = f"benchmark {self.name!r}: the records lack grading material and its dataset"
        if self.override is not None:
            path = Path(self.override)
        else:
            if not uri:
                raise InvalidInput(f"{where} is not recorded in results.json")
            try:
                path = local_path(uri)
            except UnresolvableUri as err:
                raise InvalidInput(f"{where} {uri} cannot be read here ({err})") from None
        if not path.exists():
            raise InvalidInput(f"{where} {uri or path} does not exist ({path})")
        bench = Benchmark.model_validate({"name": self.name, "kind": self.kind,
                                          "dataset": {"uri": uri or path.resolve().as_uri()},
                                          "fields": self.info.get("fields") or {}})
        try:
            rows = load_records(path, None, bench.fields.id)
        except DataError as err:
            raise InvalidInput(f"benchmark {self.name!r}: {err}") from None
        out = {}
        for i, row in enumerate(rows):
            qid = question_id(row, i, bench.fields.id)
            try:
                out[qid] = graded_record(row, bench)
            except QuestionError as err:
                raise InvalidInput(f"benchmark {self.name!r}: dataset question {qid!r}: {err}") from None
        return out

    def material(self, qid: str) -> dict:
        if self._records is None:
            self._records = self._load()
        if qid not in self._records:
            raise InvalidInput(f"benchmark {self.name!r}: question {qid!r} is not in its dataset "
                               f"{self.info.get('dataset') or self.override}")
        rec = self._records[qid]
        return {**grading_material(self.kind, rec), "tests": rec.get("tests")} if self.kind == "code" else \
            grading_material(self.kind, rec)


def _material(row: dict, kind: str, fallback: DatasetFallback) -> dict:
    """The grading material of one saved question: its own, or the dataset's checked against the record."""
    where = f"benchmark {fallback.name!r}, question {row.get('id')!r}"
    saved = row.get("grading")
    if saved is not None and "testsDigest" not in saved:
        return saved
    found = fallback.material(str(row["id"]))
    if saved is not None:  # tests saved as a digest: the dataset's must be those
        if tests_digest(found.get("tests")) != saved["testsDigest"]:
            raise InvalidInput(f"{where}: the dataset's tests differ from those the Eval graded with "
                               f"(digest {saved['testsDigest']})")
        return {**saved, "tests": found["tests"]}
    if kind == "code":
        tests = found.get("tests")
        count = len(tests) if isinstance(tests, (list, dict)) else 1
        if row.get("tests") is not None and row["tests"] != count:
            raise InvalidInput(f"{where}: the dataset has {count} tests, the Eval graded with {row['tests']}: the "
                               f"dataset changed since")
    elif found.get("answer") != row.get("reference"):
        raise InvalidInput(f"{where}: the dataset's reference {found.get('answer')!r} differs from the one the "
                           f"Eval graded against ({row.get('reference')!r}): the dataset changed since")
    return found


def _completion(sample: dict) -> Completion:
    return Completion(text=sample.get("text") or "", token_ids=None, num_tokens=int(sample.get("numTokens", 0)),
                      finish_reason=sample.get("finishReason") or "stop", rejected=sample.get("rejected"),
                      error=sample.get("error"))


def rebuild(name: str, info: dict, rows: list[dict], fallback: DatasetFallback) -> tuple[LoadedBenchmark, list]:
    """The benchmark's questions and saved completions, as the stage had them before grading."""
    kind = info["kind"]
    questions, completions = [], []
    shuffled = False
    for n, row in enumerate(rows, 1):
        where = f"records/{name}.jsonl:{n}"
        samples = row.get("samples")
        if not isinstance(samples, list) or not samples or "id" not in row:
            raise InvalidInput(f"{where}: not an Eval question record (needs id and samples)")
        rec = material_record(_material(row, kind, fallback))
        prompts = row["prompts"] if "prompts" in row else [row.get("prompt", "")]
        orders = [s.get("order") for s in samples]
        if kind == "mcq" and all(o is not None for o in orders):
            # shuffled options: sample i was shown choices in its own order and graded against its own letter
            shuffled = True
            choices = rec.get("choices") or []
            graded = []
            for s, order in zip(samples, orders):
                valid = LETTERS[:len(choices)]
                if sorted(order) != list(range(len(choices))) or s.get("reference") not in valid \
                        or rec.get("answer") not in valid \
                        or LETTERS[order.index(LETTERS.index(rec["answer"]))] != s["reference"]:
                    raise InvalidInput(f"{where}: sample {s.get('index')}: its option order and reference do not "
                                       f"match the question's options")
                graded.append({**rec, "choices": [choices[i] for i in order], "answer": s["reference"]})
            questions.append(Question(str(row["id"]), rec, prompts, graded, orders))
        else:
            questions.append(Question(str(row["id"]), rec, prompts, [rec]))
        completions.append([_completion(s) for s in samples])
    first = rows[0]
    spec = Benchmark.model_validate({
        "name": name, "kind": kind, "samples": len(first["samples"]), "shuffleChoices": shuffled,
        "dataset": {"uri": info.get("dataset") or "file:///unknown"}, "fields": info.get("fields") or {},
        **({"systemPrompt": first["systemPrompt"]} if first.get("systemPrompt") else {})})
    return LoadedBenchmark(spec, 0, questions), completions


def _changes(name: str, before: list[dict], after: list[dict]) -> list[dict]:
    out = []
    for old, new in zip(before, after):
        for s_old, s_new in zip(old["samples"], new["samples"]):
            if bool(s_old.get("correct")) != bool(s_new["correct"]):
                out.append({"benchmark": name, "question": new["id"], "sample": s_new["index"],
                            "before": {k: s_old.get(k) for k in ("correct", "reason", "extracted")},
                            "after": {k: s_new[k] for k in ("correct", "reason", "extracted")}})
    return out


def rescore(source: Source, out_dir: Path, *, name: str | None = None, code_timeout: float | None = None,
            datasets: dict[str, str | Path] | None = None,
            on_progress: Callable[[float, str], None] | None = None) -> tuple[dict, list[dict]]:
    """Re-grade ``source`` and publish the result at ``out_dir``; returns (results.json, changed samples)."""
    started = time.time()
    old = source.results
    timeout = code_timeout or old.get("codeTimeoutSeconds") or DEFAULT_CODE_TIMEOUT
    unknown = sorted(set(datasets or {}) - set(old["benchmarks"]))
    if unknown:
        raise InvalidInput(f"--dataset names {', '.join(unknown)}: not a benchmark of {source.folder} "
                           f"({', '.join(old['benchmarks'])})")
    total = sum(len(rows) for rows in source.records.values())
    summaries: dict[str, dict] = {}
    records: dict[str, list[dict]] = {}
    changes: list[dict] = []
    done = 0
    for bench, info in old["benchmarks"].items():
        rows = source.records[bench]
        run, completions = rebuild(bench, info, rows, DatasetFallback(bench, info["kind"], info,
                                                                      (datasets or {}).get(bench)))

        def report(fraction: float, _bench=bench, _done=done, _n=len(rows)) -> None:
            if on_progress:
                on_progress((_done + fraction * _n) / max(total, 1), f"re-grading {_bench}: {fraction:.0%}")

        summary, new_rows, _tokens = score_benchmark(run, completions, SimpleNamespace(code_timeout_seconds=timeout),
                                                     report)
        done += len(rows)
        flips = _changes(bench, rows, new_rows)
        changes += flips
        previous = {k: info[k] for k in ("pass1", "stderr", "passAtK", "correct") if k in info}
        summaries[bench] = {**summary, **dataset_fields(run.spec), "changedVerdicts": len(flips),
                            "previous": previous}
        records[bench] = new_rows
    metrics = status_metrics(summaries)
    results = _rounded({
        **{k: old[k] for k in ("model", "engine", "sampling") if k in old},
        "name": name or old.get("name"),
        "score": metrics["score"],
        "benchmarks": summaries,
        "codeTimeoutSeconds": timeout,
        "graders": graders_digest(),
        "generatedTokens": old.get("generatedTokens"),
        "rescore": {"source": source.folder.resolve().as_uri(), "sourceDigest": source.digest,
                    "sourceName": old.get("name"), "sourceCreatedAt": old.get("createdAt"),
                    "previousScore": old.get("score"), "previousGraders": old.get("graders"),
                    "changedVerdicts": len(changes)},
        "timing": {"grading": time.time() - started},
        "createdAt": format_time(),
    })
    publish(out_dir, results, records, {CHANGES: changes})
    return results, changes


def default_output(source: Path) -> Path:
    """``<source>/rescored/<UTC time>``: beside the old results, never over them."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out, n = source / RESCORED / stamp, 1
    while out.exists():
        n += 1
        out = source / RESCORED / f"{stamp}-{n}"
    return out


def run_regrade(ctx) -> dict[str, Any]:
    """The Eval stage with ``spec.regrade``: re-grade the referenced Eval output into this Eval's output."""
    spec = ctx.spec
    source = open_source(ctx.input_path(spec.regrade, "spec.regrade"))
    ctx.progress.update(0.0, f"re-grading {sum(len(r) for r in source.records.values())} questions of "
                             f"{source.results.get('name')}", force=True)
    results, changes = rescore(source, ctx.output_dir, name=ctx.resource.name,
                               code_timeout=spec.code_timeout_seconds,
                               on_progress=lambda f, msg: ctx.progress.update(f, msg))
    ctx.progress.update(1.0, f"score {results['score']:.3f} ({len(changes)} verdicts changed)", force=True)
    return _rounded({**status_metrics(results["benchmarks"]), "changedVerdicts": len(changes),
                     "previousScore": results["rescore"]["previousScore"],
                     "gradingSeconds": results["timing"]["grading"]})
