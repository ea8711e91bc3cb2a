"""Several workers of the real TeacherGen stage on one output, as the pods of an Indexed Job on a shared PVC:
each a ``branchmerge stage teachergen`` process with RANK/WORLD_SIZE set the way the operator sets them,
more shards than workers. Every prompt must be generated exactly once, only worker 0 may publish, and
it publishes once, after every shard is complete.

The teacher is a small OpenAI-compatible HTTP server in this test that holds back worker 0's prompts until
the other workers have exited: then worker 0 is still generating, so anything published by then was
published by another worker, and worker 0 really waits for shards it does not own."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from branchmerge.api.outputs import read_manifest
from branchmerge.trainer.teachergen.stage import assigned_shards, shard_of

PROMPTS = 30
SHARDS = 7
WORKERS = 3
SAMPLES = 2


class GatedTeacher(http.server.ThreadingHTTPServer):
    """Chat completions ``answer:<prompt>:<seed>``; prompts in ``gated`` wait until ``release`` is set."""

    daemon_threads = True

    def __init__(self, gated: set[str]):
        self.gated = gated
        self.release = threading.Event()
        self.seen: Counter = Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        if prompt in self.server.gated:
            self.server.release.wait(300)
        with self.server.lock:
            self.server.seen[(prompt, body["seed"])] += 1
        text = f"answer:{prompt}:{body['seed']}"
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                        "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def teacher():
    ids = [f"p{i:02d}" for i in range(PROMPTS)]
    mine = set(assigned_shards(0, WORKERS, SHARDS))
    server = GatedTeacher({f"question {pid}" for pid in ids if shard_of(pid, SHARDS) in mine})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    thread.join(10)


def _spec(tmp: Path, url: str) -> Path:
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i:02d}"}) + "\n" for i in range(PROMPTS)))
    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "TeacherGen", "metadata": {"name": "workers"},
           "spec": {"teacher": {"engine": {"name": "openai", "endpoint": {"baseUrl": url, "model": "t",
                                                                          "maxConcurrency": 4}}},
                    "prompts": {"dataset": {"uri": prompts.as_uri()}, "idField": "id"},
                    "template": "question {{id}}", "shards": SHARDS, "batchSize": 2,
                    "sampling": {"samplesPerPrompt": SAMPLES, "maxTokens": 16, "seed": 4},
                    "filters": {"dedup": False}, "output": {"uri": (tmp / "out").as_uri()}}}
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _start(spec: Path, tmp: Path, rank: int, wait_seconds: float = 120) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORKERS), "LOCAL_RANK": "0",
           "BRANCHMERGE_PROGRESS_FILE": str(tmp / f"progress-{rank}.jsonl"),
           "BRANCHMERGE_SHARD_POLL_SECONDS": "0.2", "BRANCHMERGE_SHARD_WAIT_SECONDS": str(wait_seconds)}
    env.pop("JOB_COMPLETION_INDEX", None)
    log = open(tmp / f"worker-{rank}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "branchmerge.cli", "stage", "teachergen", "--spec", str(spec),
                             "--result", str(tmp / f"result-{rank}.json")], env=env, stdout=log, stderr=log)


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- worker {r}\n" + (tmp / f"worker-{r}.log").read_text()[-3000:] for r in range(WORKERS))


def test_workers_run_every_shard_once_and_only_worker_0_publishes(tmp_path, teacher):
    spec = _spec(tmp_path, teacher.url)
    out = tmp_path / "out"
    procs = [_start(spec, tmp_path, rank) for rank in range(WORKERS)]
    try:
        deadline = time.time() + 240
        while any(p.poll() is None for p in procs[1:]) and time.time() < deadline:
            time.sleep(0.2)
        codes = [p.poll() for p in procs[1:]]
        assert codes == [0] * (WORKERS - 1), f"workers 1..{WORKERS - 1}: {codes}\n{_logs(tmp_path)}"
        # the other workers are done, worker 0 still generates its own (held back) shards: nothing published
        assert procs[0].poll() is None, _logs(tmp_path)
        assert not out.exists() and read_manifest(out) is None
        assert not list(tmp_path.glob(".tmp-out-*"))
        for shard in range(SHARDS):
            done = (tmp_path / "out.work" / f"shard-{shard:05d}" / "complete.json").exists()
            assert done == (shard % WORKERS != 0), (shard, done)
        teacher.release.set()
        assert procs[0].wait(240) == 0, _logs(tmp_path)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    # every (prompt, sample) was asked of the teacher exactly once across the workers
    assert len(teacher.seen) == PROMPTS * SAMPLES and set(teacher.seen.values()) == {1}, teacher.seen
    records = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert sorted(Counter(r["promptId"] for r in records).items()) == [(f"p{i:02d}", SAMPLES) for i in range(PROMPTS)]
    keys = [(r["promptId"], r["sampleIndex"]) for r in records]
    assert keys == sorted(set(keys))
    manifest = json.loads((out / "teachergen.json").read_text())
    assert manifest["counts"]["promptsDone"] == PROMPTS and manifest["counts"]["shards"] == SHARDS
    result = json.loads((tmp_path / "result-0.json").read_text())
    assert result["phase"] == "Succeeded" and result["metrics"]["promptsDone"] == PROMPTS
    assert not list(tmp_path.glob(".tmp-out-*"))  # no temp folder left beside the output
    # worker 0 waited for the others' shards and published once, at the end
    events = [json.loads(line) for line in (tmp_path / "progress-0.jsonl").read_text().splitlines()]
    messages = [e.get("message", "") for e in events]
    assert sum(m == "published" for m in messages) == 1 and messages[-1] == "published", messages


def test_worker_0_gives_up_on_a_missing_worker_with_a_retryable_error(tmp_path, teacher):
    """Worker 1 of 3 never runs: worker 0 does its shards, waits a bounded time without progress, exits 3
    (retryable) naming the missing shards and their worker; a rerun with every worker resumes and publishes."""
    teacher.release.set()
    spec = _spec(tmp_path, teacher.url)
    procs = [_start(spec, tmp_path, rank, wait_seconds=1) for rank in (0, 2)]
    for p in procs:
        p.wait(240)
    assert procs[1].returncode == 0, (tmp_path / "worker-2.log").read_text()
    assert procs[0].returncode == 3, (tmp_path / "worker-0.log").read_text()
    result = json.loads((tmp_path / "result-0.json").read_text())
    missing = [s for s in range(SHARDS) if s % WORKERS == 1]
    assert "not complete and no progress" in result["error"] and "workers 1 of 3" in result["error"], result
    assert f"shards {','.join(map(str, missing))}" in result["error"], result
    assert not (tmp_path / "out").exists()
    # the retry: all workers again; the committed shards are not generated again
    asked = sum(teacher.seen.values())
    procs = [_start(spec, tmp_path, rank) for rank in range(WORKERS)]
    assert [p.wait(240) for p in procs] == [0] * WORKERS, _logs(tmp_path)
    assert sum(teacher.seen.values()) - asked == sum(
        SAMPLES for i in range(PROMPTS) if shard_of(f"p{i:02d}", SHARDS) in missing)
    assert len(teacher.seen) == PROMPTS * SAMPLES and set(teacher.seen.values()) == {1}
    assert read_manifest(tmp_path / "out") is not None
