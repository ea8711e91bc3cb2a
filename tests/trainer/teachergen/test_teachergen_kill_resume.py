"""Kill the TeacherGen worker (SIGKILL) at random points several times; the final dataset must equal an
uninterrupted run's: no lost and no duplicate (promptId, sampleIndex), same counts.

The teacher is the local OpenAI-compatible server (a thread of this test, answers depend only on prompt and
seed): a worker process then starts in ~2 s instead of ~30 s for torch + transformers on a loaded machine,
so the test can afford several kills. The stage code path is the same for every engine."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from branchmerge.api.outputs import folder_digests, read_manifest
from branchmerge.trainer import stage as stage_entry

from tests.conftest import manifest

KILLS = 4


def spec_doc(url: str, prompts: Path, out: Path) -> dict:
    return manifest("TeacherGen", "kill",
                    {"teacher": {"engine": {"name": "openai", "endpoint": {"baseUrl": url, "model": "t",
                                                                           "maxConcurrency": 2}}},
                     "prompts": {"dataset": {"uri": prompts.as_uri()}},
                     "template": "{{problem}}", "shards": 3, "batchSize": 2,
                     "sampling": {"samplesPerPrompt": 3, "maxTokens": 64, "seed": 9},
                     "verify": {"kind": "math", "answerField": "answer"}, "select": {"mode": "all-correct"},
                     "filters": {"dedup": False}, "output": {"uri": out.as_uri()}})


def committed_batches(work: Path) -> int:
    return sum(p.read_text().count("\n") for p in work.rglob("commits.jsonl")) if work.exists() else 0


@pytest.mark.slow
def test_random_kills_lose_and_duplicate_nothing(tmp_path, server):
    def answer(body: dict) -> str:  # right for two seeds in three: verification rejects some samples
        i = int(body["messages"][-1]["content"].split()[-1])
        return f"<think>box {i}</think> \\boxed{{{i if body['seed'] % 3 else i + 1}}}"

    server.answer = answer
    server.delay = 0.05  # the streamed run is quick: slow enough that kills land mid-run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"apples in box {i}", "answer": str(i)}) + "\n"
                               for i in range(30)))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    ref_spec = tmp_path / "ref.yaml"
    ref_spec.write_text(yaml.safe_dump(spec_doc(server.url, prompts, reference)))
    assert stage_entry.run_stage("teachergen", ref_spec) == 0

    spec = tmp_path / "kill.yaml"
    spec.write_text(yaml.safe_dump(spec_doc(server.url, prompts, killed)))
    work = tmp_path / "killed.work"
    seed = int(os.environ.get("BRANCHMERGE_KILL_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    cmd = [sys.executable, "-m", "branchmerge", "stage", "teachergen", "--spec", str(spec)]
    # a commit per finished prompt (as a slow endpoint makes it): kills land between many small commits
    env = dict(os.environ, OMP_NUM_THREADS="1", BRANCHMERGE_COMMIT_SECONDS="0")
    env.pop("BRANCHMERGE_PROGRESS_FILE", None)
    kills_mid_run = 0
    for attempt in range(KILLS):
        before = committed_batches(work)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and committed_batches(work) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))  # land anywhere: mid-generation, mid-write, between batches
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills_mid_run += 1
        proc.wait()
    assert kills_mid_run >= 2, f"seed {seed}: the worker finished before it could be killed"
    if killed.exists():  # a kill can land after the publishing rename, while the process exits: then the
        # output must be whole (its manifest matches every file), never a half-written folder
        assert read_manifest(killed) == folder_digests(killed), f"seed {seed}"
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, f"seed {seed}: {final.stderr[-2000:]}"

    def load(folder: Path) -> list[dict]:
        return [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]

    got, want = load(killed), load(reference)
    keys = [(r["promptId"], r["sampleIndex"]) for r in got]
    assert len(keys) == len(set(keys)), f"seed {seed}: duplicates"
    assert keys == [(r["promptId"], r["sampleIndex"]) for r in want], f"seed {seed}: lost or extra samples"
    assert got == want
    assert 30 < len(keys) < 90  # some samples kept, some rejected: the comparison is not vacuous
    counts = json.loads((killed / "teachergen.json").read_text())["counts"]
    assert counts == json.loads((reference / "teachergen.json").read_text())["counts"]
    assert counts["promptsDone"] == 30 and counts["samplesGenerated"] == 90
    assert counts["samplesKept"] + counts["samplesRejected"] == 90
