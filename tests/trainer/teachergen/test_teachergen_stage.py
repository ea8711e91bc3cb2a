"""The TeacherGen stage end to end through the stage entry point (in-process, tiny model / local endpoint)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from branchmerge.api.outputs import read_manifest, sha256_file
from branchmerge.api.progress import read_events
from branchmerge.api.teachergen import TINYR1_MATH_TEMPLATE
from branchmerge.trainer import stage as stage_entry
from branchmerge.api.common import API_KEY_ENV


def write_prompts(path: Path, n: int = 8) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"problem": f"what is {i} + {i} ?", "answer": str(2 * i), "source": f"s{i % 2}"}) + "\n")
    return path


def write_spec(tmp: Path, spec: dict, name: str = "spec.yaml") -> Path:
    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "TeacherGen", "metadata": {"name": "tg"}, "spec": spec}
    path = tmp / name
    path.write_text(yaml.safe_dump(doc))
    return path


def tiny_spec(tmp: Path, model: Path, out: str = "out", **over) -> dict:
    spec = {"teacher": {"model": {"uri": model.as_uri()}, "engine": {"name": "transformers", "dtype": "float32"}},
            "prompts": {"dataset": {"uri": write_prompts(tmp / "prompts.jsonl").as_uri()}, "fields": ["source"]},
            "template": TINYR1_MATH_TEMPLATE, "systemPrompt": "You are a teacher.",
            "sampling": {"samplesPerPrompt": 3, "temperature": 1.0, "maxTokens": 8, "seed": 3},
            "verify": {"kind": "math", "answerField": "answer"}, "filters": {"dedup": True},
            "shards": 3, "batchSize": 2, "output": {"uri": (tmp / out).as_uri()}}
    spec.update(over)
    return spec


def run_stage(spec_file: Path, tmp: Path, monkeypatch) -> tuple[int, dict]:
    monkeypatch.setenv("BRANCHMERGE_PROGRESS_FILE", str(tmp / "progress.jsonl"))
    result = tmp / "result.json"
    code = stage_entry.run_stage("teachergen", spec_file, result)
    return code, json.loads(result.read_text())


@pytest.mark.slow
def test_local_run_publishes_chat_dataset_and_resumes_as_noop(tmp_path, tiny_model, monkeypatch):
    spec_file = write_spec(tmp_path, tiny_spec(tmp_path, tiny_model))
    code, result = run_stage(spec_file, tmp_path, monkeypatch)
    assert code == 0, result
    out = tmp_path / "out"
    files = read_manifest(out)
    assert set(files) == {"data.jsonl", "teachergen.json"}
    records = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    manifest = json.loads((out / "teachergen.json").read_text())
    metrics = result["metrics"]
    # every sample is accounted for: kept + rejected by reason = generated = prompts * n
    assert metrics["promptsDone"] == 8 and metrics["samplesGenerated"] == 24
    assert metrics["samplesKept"] + sum(metrics["samplesRejected"].values()) == 24
    assert metrics["samplesKept"] == len(records) == manifest["counts"]["samplesKept"]
    assert metrics["tokensGenerated"] > 0 and metrics["tokensPerSecond"] > 0
    assert manifest["acceptance"]["rejectedByReason"] == metrics["samplesRejected"]
    assert manifest["sampling"]["samplesPerPrompt"] == 3 and manifest["teacher"]["engine"]["name"] == "transformers"
    keys = [(r["promptId"], r["sampleIndex"]) for r in records]
    assert keys == sorted(set(keys))
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert r["messages"][1]["content"].endswith("within \\boxed{}.")
        assert r["verdict"]["reason"] in ("correct", "wrong_answer", "no_boxed_answer")
        assert r["meta"]["source"] in ("s0", "s1")
    events, _ = read_events(tmp_path / "progress.jsonl")
    assert events[-1]["fraction"] == 1.0 and events[-1]["metrics"]["promptsDone"] == 8
    # a rerun finds every shard complete: nothing is generated again and the output is identical
    digest = sha256_file(out / "data.jsonl")
    commits = sorted((tmp_path / "out.work").rglob("commits.jsonl"))
    before = [c.read_bytes() for c in commits]
    code, again = run_stage(spec_file, tmp_path, monkeypatch)
    assert code == 0 and again["metrics"] == metrics
    assert [c.read_bytes() for c in commits] == before and sha256_file(out / "data.jsonl") == digest


@pytest.mark.slow
def test_indexed_workers_give_the_same_dataset_as_one_process(tmp_path, tiny_model, monkeypatch):
    """Workers 1 and 2 of 3 (RANK/WORLD_SIZE as the operator sets them) run their shards and leave without
    publishing; worker 0 runs its own, finds every shard complete and publishes what one process does."""
    local = tmp_path / "local"
    indexed = tmp_path / "indexed"
    local.mkdir(), indexed.mkdir()
    assert run_stage(write_spec(local, tiny_spec(local, tiny_model)), local, monkeypatch)[0] == 0
    spec_file = write_spec(indexed, tiny_spec(indexed, tiny_model, shards=5))
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank in (2, 1):
        monkeypatch.setenv("RANK", str(rank))
        assert stage_entry.run_stage("teachergen", spec_file, indexed / f"result-{rank}.json") == 0
        assert not (indexed / "out").exists() and not (indexed / f"result-{rank}.json").exists()
    complete = sorted(p.parent.name for p in (indexed / "out.work").glob("shard-*/complete.json"))
    assert complete == ["shard-00001", "shard-00002", "shard-00004"]
    monkeypatch.setenv("RANK", "0")
    code, result = run_stage(spec_file, indexed, monkeypatch)
    assert code == 0 and result["metrics"]["promptsDone"] == 8, result
    assert (indexed / "out" / "data.jsonl").read_bytes() == (local / "out" / "data.jsonl").read_bytes()
    # a late duplicate worker 0 (e.g. a retried pod) finds the dataset published and leaves it alone
    before = (indexed / "out" / "_manifest.json").stat().st_ino
    assert run_stage(spec_file, indexed, monkeypatch)[0] == 0
    assert (indexed / "out" / "_manifest.json").stat().st_ino == before


def test_changed_spec_starts_over_and_bad_template_is_invalid(tmp_path, tiny_model, monkeypatch):
    spec = tiny_spec(tmp_path, tiny_model, sampling={"samplesPerPrompt": 1, "temperature": 0.0, "maxTokens": 4}, shards=1)
    assert run_stage(write_spec(tmp_path, spec), tmp_path, monkeypatch)[0] == 0
    first = json.loads((tmp_path / "out.work" / "spec.json").read_text())["sha256"]
    spec["sampling"]["maxTokens"] = 5
    assert run_stage(write_spec(tmp_path, spec), tmp_path, monkeypatch)[0] == 0
    assert json.loads((tmp_path / "out.work" / "spec.json").read_text())["sha256"] != first
    assert {json.loads(line)["numTokens"] for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()
            } <= {1, 2, 3, 4, 5}
    spec["template"] = "{{question}}"
    code, result = run_stage(write_spec(tmp_path, spec), tmp_path, monkeypatch)
    assert code == 2 and "template" in result["error"] and "'question'" in result["error"]


CORRECT = "<think>add them</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
WRONG = "<think>hmm</think>\n```python\nprint(0)\n```"
LOOPS = "<think>hmm</think>\n```python\nwhile True:\n    pass\n```"


def test_openai_teacher_with_code_verification(tmp_path, server, monkeypatch):
    """Prompt p0 is answered correctly by every sample, p1 only by sample 1, p2 never (one sample loops)."""
    def answer(body: dict) -> str:
        prompt, sample = body["messages"][-1]["content"], body["seed"]
        if "p0" in prompt:
            return CORRECT + f"\n# variant {sample}"
        if "p1" in prompt:
            return CORRECT if sample % 2 else WRONG
        return LOOPS if sample % 2 else WRONG

    server.answer = answer
    monkeypatch.setenv(API_KEY_ENV, "sk-stage-secret")
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "4 5\n", "output": "9\n"}]
    with open(tmp_path / "code.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": f"p{i}", "question": f"p{i}: add two numbers", "tests": tests}) + "\n")
    spec = {"teacher": {"engine": {"name": "openai", "endpoint": {"baseUrl": server.url, "model": "teacher"}}},
            "prompts": {"dataset": {"uri": (tmp_path / "code.jsonl").as_uri()}, "idField": "id"},
            "template": "{{question}}", "sampling": {"samplesPerPrompt": 2, "maxTokens": 64, "seed": 0},
            "verify": {"kind": "code", "testsField": "tests", "timeoutSeconds": 1},
            "select": {"mode": "all-correct"}, "filters": {"requireThink": True},
            "output": {"uri": (tmp_path / "out").as_uri()}}
    seeds = {}
    from branchmerge.trainer.teachergen.stage import prompt_seed
    for i in range(3):
        seeds[f"p{i}"] = prompt_seed(0, f"p{i}")
    code, result = run_stage(write_spec(tmp_path, spec), tmp_path, monkeypatch)
    assert code == 0, result
    records = [json.loads(line) for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    expected_kept = [("p0", 0), ("p0", 1)] + [("p1", j) for j in range(2) if (seeds["p1"] + j) % 2]
    assert [(r["promptId"], r["sampleIndex"]) for r in records] == expected_kept
    assert all(r["verdict"]["correct"] is True for r in records)
    rejected = result["metrics"]["samplesRejected"]
    assert sum(rejected.values()) == 6 - len(expected_kept)
    assert set(rejected) <= {"verify:wrong_answer", "verify:timeout"}
    manifest = (tmp_path / "out" / "teachergen.json").read_text()
    assert "sk-stage-secret" not in manifest and "sk-stage-secret" not in json.dumps(result)


def _endpoint_spec(tmp_path: Path, url: str) -> dict:
    return {"teacher": {"engine": {"name": "openai", "endpoint": {"baseUrl": url, "model": "teacher",
                                                                   "maxRetries": 0}}},
            "prompts": {"dataset": {"uri": write_prompts(tmp_path / "prompts.jsonl", 4).as_uri()}},
            "template": "{{problem}}", "sampling": {"samplesPerPrompt": 2, "maxTokens": 64, "seed": 0},
            "verify": {"kind": "none"}, "batchSize": 2, "output": {"uri": (tmp_path / "out").as_uri()}}


def test_a_request_the_endpoint_refuses_rejects_its_samples_and_the_stage_goes_on(tmp_path, server, monkeypatch):
    server.refuse = lambda body: ((400, "This model's maximum context length is 8 tokens.")
                                  if body["messages"][-1]["content"] == "what is 2 + 2 ?" else None)
    code, result = run_stage(write_spec(tmp_path, _endpoint_spec(tmp_path, server.url)), tmp_path, monkeypatch)
    assert code == 0, result
    assert result["metrics"]["samplesRejected"] == {"engine:http_400": 2}
    assert result["metrics"]["samplesKept"] == 6 and result["metrics"]["samplesGenerated"] == 8
    records = [json.loads(line) for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all("2 + 2" not in r["messages"][0]["content"] for r in records)
    manifest = json.loads((tmp_path / "out" / "teachergen.json").read_text())
    assert manifest["acceptance"]["engineErrors"] == {
        "engine:http_400": "HTTP 400: This model's maximum context length is 8 tokens."}


def test_an_endpoint_that_refuses_every_request_fails_the_stage_as_invalid(tmp_path, server, monkeypatch):
    server.status_override, server.status_message = 401, "invalid api key"
    code, result = run_stage(write_spec(tmp_path, _endpoint_spec(tmp_path, server.url)), tmp_path, monkeypatch)
    assert code == 2 and "HTTP 401: invalid api key" in result["error"], result
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_stage_on_the_vllm_engine_matches_the_engine_output(tmp_path, tiny_model, tiny_vllm):
    """The stage with the session's vLLM engine: each kept sample is exactly what the engine gives that prompt."""
    from branchmerge.api.common import Sampling
    from branchmerge.api.validation import parse_resource
    from branchmerge.trainer.progress import Progress
    from branchmerge.trainer.stage import StageContext
    from branchmerge.trainer.teachergen import stage as teachergen
    from branchmerge.trainer.teachergen.prompts import assign_ids, load_records, render

    spec = tiny_spec(tmp_path, tiny_model, verify={"kind": "none"}, filters={"dedup": False},
                     sampling={"samplesPerPrompt": 2, "temperature": 0.8, "maxTokens": 12, "seed": 5, "stop": ["e"]})
    spec["teacher"]["engine"] = {"name": "vllm", "dtype": "float32", "enforceEager": True, "maxModelLen": 1024}
    spec.pop("systemPrompt")
    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "TeacherGen", "metadata": {"name": "v"}, "spec": spec}
    ctx = StageContext(parse_resource(doc), spec["output"]["uri"], tmp_path / "out", Progress(enabled=False))
    metrics = teachergen.run(ctx, engine=tiny_vllm)
    records = {(r["promptId"], r["sampleIndex"]): r for r in map(json.loads, (tmp_path / "out" / "data.jsonl")
                                                                    .read_text().splitlines())}
    pairs = assign_ids(load_records(tmp_path / "prompts.jsonl"), None)
    sampling = Sampling(temperature=0.8, max_tokens=12, seed=5, stop=["e"])
    direct = tiny_vllm.generate([[{"role": "user", "content": render(TINYR1_MATH_TEMPLATE, r)}] for _, r in pairs],
                                sampling, n=2, seeds=[teachergen.prompt_seed(5, pid) for pid, _ in pairs])
    expected = {(pid, j): c for (pid, _), cs in zip(pairs, direct) for j, c in enumerate(cs) if not c.truncated}
    assert set(records) == set(expected) and expected
    assert all(records[k]["messages"][-1]["content"] == c.text and records[k]["numTokens"] == c.num_tokens
               for k, c in expected.items())
    assert metrics["samplesRejected"].get("truncated", 0) == 16 - len(expected)
