"""The streaming stage: prompts are committed as they finish, a slow prompt holds back nobody's commit, and
the published dataset is byte for byte the batch path's (the teacher is the local OpenAI-compatible server)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from branchmerge.api.validation import parse_resource
from branchmerge.trainer.progress import Progress
from branchmerge.trainer.stage import StageContext
from branchmerge.trainer.teachergen import stage as teachergen


PROMPTS = 12


def _ctx(tmp: Path, url: str, out: str, batch: int = 4) -> StageContext:
    prompts = tmp / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"problem": f"question {i}"}) + "\n" for i in range(PROMPTS)))
    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "TeacherGen", "metadata": {"name": "s"},
           "spec": {"teacher": {"engine": {"name": "openai", "endpoint": {"baseUrl": url, "model": "t",
                                                                          "maxConcurrency": 3}}},
                    "prompts": {"dataset": {"uri": prompts.as_uri()}}, "template": "{{problem}}",
                    "sampling": {"samplesPerPrompt": 2, "maxTokens": 64, "seed": 7}, "verify": {"kind": "none"},
                    "filters": {"dedup": False}, "shards": 2, "batchSize": batch,
                    "output": {"uri": (tmp / out).as_uri()}}}
    return StageContext(parse_resource(doc), doc["spec"]["output"]["uri"], tmp / out, Progress(enabled=False))


def _committed(work: Path) -> set[str]:
    return {pid for p in work.glob("shard-*/commits.jsonl")
            for line in p.read_text().splitlines() if line.endswith("}") for pid in json.loads(line)["prompts"]}


def test_a_slow_prompt_does_not_hold_back_the_other_commits(tmp_path, server, monkeypatch):
    monkeypatch.setenv("BRANCHMERGE_COMMIT_SECONDS", "0.2")
    server.hold = lambda body: body["messages"][-1]["content"] == "question 3"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(teachergen.run(_ctx(tmp_path, server.url, "out"))))
    runner.start()
    work = tmp_path / "out.work"
    deadline = time.monotonic() + 60
    while len(_committed(work)) < PROMPTS - 1 and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.05)
    committed, held = _committed(work), server.held
    server.released.set()
    runner.join(60)
    assert held == 2 and len(committed) == PROMPTS - 1, (held, committed)  # all but the slow one, while it ran
    assert result["promptsDone"] == PROMPTS and result["samplesGenerated"] == 2 * PROMPTS
    assert server.max_in_flight <= 3


def test_streamed_dataset_is_byte_identical_to_the_batch_path(tmp_path, server, monkeypatch):
    monkeypatch.setenv("BRANCHMERGE_COMMIT_SECONDS", "0")  # a commit per prompt, in finish order
    server.delay = 0.01
    teachergen.run(_ctx(tmp_path, server.url, "streamed"))
    monkeypatch.setattr(teachergen.TeacherGenSession, "streaming", False)
    teachergen.run(_ctx(tmp_path, server.url, "batched", batch=5))
    streamed, batched = tmp_path / "streamed", tmp_path / "batched"
    assert (streamed / "data.jsonl").read_bytes() == (batched / "data.jsonl").read_bytes()
    manifests = [json.loads((folder / "teachergen.json").read_text()) for folder in (streamed, batched)]
    for m in manifests:
        m["tokens"].pop("tokensPerSecond")
    assert manifests[0] == manifests[1]
    assert sum(1 for _ in (tmp_path / "streamed.work").glob("shard-*/commits.jsonl")) == 2
    assert len(_committed(tmp_path / "streamed.work")) == PROMPTS
