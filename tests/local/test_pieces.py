"""The runner's pure pieces: cache identity, kubectl-style tables, ETA, the report's retained-gain check."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from branchmerge.api import conditions as cond
from branchmerge.operator.local import cache
from branchmerge.operator.local.display import eta_seconds
from branchmerge.report import Row, Stage, acceptance, gain_text, retention, verdicts
from branchmerge.operator.local.table import find, get_table

from tests.conftest import manifest


def merge_doc(uri_a: str, uri_b: str) -> dict:
    return manifest("Merge", "m", {"method": "linear", "models": [{"uri": uri_a}, {"uri": uri_b}],
                                  "output": {"uri": "file:///o"}})


def test_cache_key_follows_input_content_not_only_uris(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b"
    a.write_text('{"x": 1}\n')
    b.mkdir()
    (b / "_manifest.json").write_text(json.dumps({"files": {"w": "1" * 64}}))
    doc = merge_doc(a.as_uri(), b.as_uri())
    first = cache.cache_key(doc, cache.input_digests(doc, {}))
    assert first == cache.cache_key(doc, cache.input_digests(doc, {}))
    a.write_text('{"x": 2}\n')  # same URI, new content
    second = cache.cache_key(doc, cache.input_digests(doc, {}))
    assert second != first
    # an upstream's reported digest stands for its output, whatever is on disk
    digests = cache.input_digests(doc, {b.as_uri(): "sha256:upstream"})
    assert digests["spec.models[1]"] == "sha256:upstream"
    assert cache.content_digest("hf://org/model@v1") == "uri:hf://org/model@v1"


def test_is_cached_needs_success_same_key_and_intact_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    files = {"model.safetensors": "a" * 64}
    (out / "_manifest.json").write_text(json.dumps({"files": files}))
    from branchmerge.api.outputs import combined_digest

    record = {"metadata": {"annotations": {"local.branchmerge.dev/cache-key": "k1"}},
              "status": {"phase": "Succeeded", "output": {"uri": out.as_uri(), "digest": combined_digest(files)}}}
    assert cache.is_cached(record, "k1")
    assert not cache.is_cached(record, "k2")
    (out / "_manifest.json").unlink()  # output deleted or half-replaced: rerun
    assert not cache.is_cached(record, "k1")


def record(kind, name, phase, reason, **status):
    st = {"phase": phase, "startTime": "2026-01-01T00:00:00Z", **status}
    cond.set_phase(st, phase, reason)
    return manifest(kind, name, {"domain": "math"} if kind == "BranchSFT" else {}, status=st)


def test_get_table_groups_kinds_in_pipeline_order_with_their_column():
    records = [record("Eval", "e", "Succeeded", "Succeeded", completionTime="2026-01-01T00:01:05Z",
                      metrics={"score": 0.4567}),
               record("BranchSFT", "math", "Failed", "UpstreamFailed")]
    text = get_table(records, now=datetime(2026, 1, 1, 0, 2, tzinfo=timezone.utc))
    sft_block, eval_block = text.split("\n\n")
    assert sft_block.splitlines()[0].split() == ["BRANCHSFTS", "PHASE", "REASON", "DOMAIN", "PROGRESS", "DURATION",
                                                 "AGE"]
    assert sft_block.splitlines()[1].split()[:4] == ["math", "Failed", "UpstreamFailed", "math"]
    assert eval_block.splitlines()[1].split() == ["e", "Succeeded", "Succeeded", "0.4567", "-", "1m05s", "2m00s"]
    assert [r["metadata"]["name"] for r in find(records, "bsft/math")] == ["math"]
    assert find(records, "Merge/math") == []


def test_eta_ignores_startup_time():
    assert eta_seconds(0.5, elapsed=100) == 100
    # 80 s of imports, then 10 s for the first half: 10 s to go
    assert eta_seconds(0.5, elapsed=90, first=(1080.0, 0.0), now=1090.0) == 10
    assert eta_seconds(0.0, elapsed=10) is None and eta_seconds(1.0, elapsed=10) is None


def test_retained_gain_and_verdict_with_the_spread_over_eval_seeds():
    """The check a new user reads: what each merge keeps of each branch's gain, the range over eval seeds, and
    one verdict that fails when any seed puts the merge at or below the base on a domain."""
    def row(label, role, domain, math, code):  # per benchmark: pass@1 under each of 2 eval seeds
        seeds = {"math": math, "code": code}
        return Row(label, role, domain, {b: (sum(v) / 2, 0, None) for b, v in seeds.items()}, seeds)

    rows = [row("base", "base", None, [0.1, 0.1], [0.2, 0.2]),
            row("math", "branch", "math", [0.6, 0.6], [0.1, 0.1]),
            row("code", "branch", "code", [0.1, 0.1], [0.7, 0.7]),
            row("steady", "merge", None, [0.35, 0.35], [0.40, 0.50]),  # above the base under both seeds
            row("lucky", "merge", None, [0.50, 0.08], [0.45, 0.45])]  # mean above, one seed below the base
    kept = {(r.merge, r.domain): r for r in retention(rows)}
    assert kept["steady", "math"].gain == pytest.approx(0.5) and kept["steady", "code"].gain == pytest.approx(0.5)
    assert kept["steady", "code"].gains == pytest.approx([0.4, 0.6])  # the spread over the two seeds
    assert kept["lucky", "math"].gain == pytest.approx(0.38) and kept["lucky", "math"].gains == pytest.approx([0.8, -0.04])
    assert gain_text(kept["steady", "code"]) == "0.50 [0.40, 0.60]"
    verdict = {claim: ok for claim, ok, _ in verdicts(retention(rows))}
    assert verdict == {"steady above the base on every domain under each eval seed (k=2)": True,
                       "lucky above the base on every domain under each eval seed (k=2)": False}
    # a branch that did not beat the base has no gain to keep; the verdict still judges the merge against the base
    flat = [row("base", "base", None, [0.3, 0.3], [0.2, 0.2]), row("math", "branch", "math", [0.3, 0.2], [0.1, 0.1]),
            row("m", "merge", None, [0.4, 0.4], [0.3, 0.3])]
    [only] = retention(flat)
    assert only.gain is None and gain_text(only) == "n/a (branch not above base)" and only.above_base
    # without per-seed records the verdict falls back to the mean scores and says so
    no_seeds = [Row(r.label, r.role, r.domain, r.scores) for r in rows]
    assert [claim for claim, _, _ in verdicts(retention(no_seeds))][0].endswith("(one score each, no seed spread)")


def test_acceptance_by_reason():
    stage = Stage("TeacherGen/t", {"kind": "TeacherGen", "metadata": {"name": "t"}, "status": {}},
                  {"metrics": {"samplesKept": 7, "samplesRejected": {"wrong_answer": 3, "duplicate": 1}}}, [])
    assert acceptance(stage) == {"kept": 7, "wrong_answer": 3, "duplicate": 1}


def test_branchsft_ranks_map_to_a_torchrun_launch_capped_to_the_cores(tmp_path):
    from branchmerge.api.validation import parse_resource
    from branchmerge.operator.local.launch import local_ranks, stage_command, stage_env

    def sft(nodes: int, gpus: int):
        return parse_resource({"apiVersion": "branchmerge.dev/v1alpha1", "kind": "BranchSFT",
                               "metadata": {"name": "b"},
                               "spec": {"base": {"uri": "file:///m"}, "data": [{"uri": "file:///d.jsonl"}],
                                        "training": {"globalBatchSize": 64},
                                        "resources": {"nodes": nodes, "gpusPerNode": gpus,
                                                      "env": [{"name": "X", "value": "1"}]}}})

    assert local_ranks(sft(1, 0), cores=2) == 1
    assert local_ranks(sft(2, 0), cores=2) == 2
    assert local_ranks(sft(4, 8), cores=2) == 2  # 32 ranks asked, 2 cores here
    argv, ranks = stage_command(sft(2, 0), tmp_path / "s.yaml", tmp_path / "r.json", 2)
    assert ranks == 2 and argv[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node" in argv
    assert argv[argv.index("--nproc-per-node") + 1] == "2" and argv[-2:] == ["--result", str(tmp_path / "r.json")]
    argv, ranks = stage_command(sft(1, 0), tmp_path / "s.yaml", tmp_path / "r.json", 1)
    assert ranks == 1 and argv[1:5] == ["-m", "branchmerge.cli", "stage", "sft"]
    env = stage_env(sft(1, 0), tmp_path / "p.jsonl", threads=1, cores=[1])
    assert env["BRANCHMERGE_PROGRESS_FILE"] == str(tmp_path / "p.jsonl") and env["X"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
