"""TeacherGen building blocks: prompt loading/ids/templates, selection and filters, committed batch store."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from branchmerge.api.teachergen import TINYR1_MATH_TEMPLATE, Filters, Select
from branchmerge.trainer.engine import Completion
from branchmerge.trainer.errors import InvalidInput
from branchmerge.trainer.grading import Verdict
from branchmerge.trainer.teachergen.prompts import assign_ids, derived_id, load_records, render
from branchmerge.trainer.teachergen.selection import decide, has_closed_think
from branchmerge.trainer.teachergen import stage as teachergen
from branchmerge.trainer.teachergen.stage import shard_of
from branchmerge.trainer.workers import ShardStore


def test_tinyr1_template_keeps_single_braces():
    text = render(TINYR1_MATH_TEMPLATE, {"problem": "Find $x^{2}$ if x={3}."})
    assert text == "Find $x^{2}$ if x={3}.\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert render("{{ a }}/{{b}}/{c}", {"a": 1, "b": ["x"]}) == '1/["x"]/{c}'
    with pytest.raises(InvalidInput, match="no field 'missing'"):
        render("{{missing}}", {"a": 1}, "p1")


def test_derived_ids_are_stable_sorted_and_collapse_duplicates():
    records = [{"q": "b"}, {"q": "a"}, {"q": "b"}]
    ids = assign_ids(records, None)
    assert len(ids) == 2 and [pid for pid, _ in ids] == sorted(pid for pid, _ in ids)
    assert derived_id({"q": "a", "z": 1}) == derived_id({"z": 1, "q": "a"})
    assert [pid for pid, _ in assign_ids([{"id": 7}, {"id": "3"}], "id")] == ["3", "7"]
    with pytest.raises(InvalidInput, match="duplicate id"):
        assign_ids([{"id": 1}, {"id": 1}], "id")
    with pytest.raises(InvalidInput, match="record 1 has no field 'id'"):
        assign_ids([{"id": 1}, {"x": 1}], "id")


def test_load_jsonl_parquet_and_folders(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"q": "1"}\n\n{"q": "2"}\n')
    pq.write_table(pa.table({"q": ["3", "4"]}), tmp_path / "b.parquet")
    (tmp_path / "_manifest.json").write_text("{}")
    assert sorted(r["q"] for r in load_records(tmp_path)) == ["1", "2", "3", "4"]
    bad = tmp_path / "bad" / "x.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"q": 1}\n{oops\n')
    with pytest.raises(InvalidInput, match=r"x.jsonl:2: invalid JSON"):
        load_records(bad)
    with pytest.raises(InvalidInput, match="no .jsonl"):
        load_records((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_shards_are_deterministic_and_cover_everything():
    ids = [f"p{i}" for i in range(200)]
    shards = [shard_of(i, 4) for i in ids]
    assert shards == [shard_of(i, 4) for i in ids] and set(shards) == {0, 1, 2, 3}


def C(text: str, tokens: int = 10, finish: str = "stop") -> Completion:
    return Completion(text=text, token_ids=None, num_tokens=tokens, finish_reason=finish)


def grader(calls: list):
    def verify(text: str) -> Verdict:
        calls.append(text)
        return Verdict("right" in text, "correct" if "right" in text else "wrong_answer", None)
    return verify


def test_selection_filters_and_modes():
    samples = [C("<think>a</think> right", 5), C("<think>b</think> wrong", 5), C("no think right", 5),
               C("<think>a</think>   right", 5), C("<think>x</think> right long", 50),
               C("<think>y</think> right cut", 9, "length"), C("<think>z</think> right again", 5)]
    calls: list = []
    d = decide(samples, select=Select(mode="all"), filters=Filters(max_response_tokens=20, require_think=True),
               verify_kind="math", verify=grader(calls))
    assert [x.rejected for x in d] == [None, None, "no_think", "duplicate", "too_long", "truncated", None]
    assert d[1].verdict.correct is False  # kept in mode all, verdict stored
    d = decide(samples, select=Select(mode="all-correct", max_per_prompt=1), filters=Filters(),
               verify_kind="math", verify=grader(calls := []))
    assert [x.rejected for x in d] == [None, "max_per_prompt", "max_per_prompt", "max_per_prompt",
                                       "max_per_prompt", "truncated", "max_per_prompt"]
    assert len(calls) == 1  # nothing verified past the cap
    d = decide(samples[1:], select=Select(mode="first-correct"), filters=Filters(dedup=False),
               verify_kind="math", verify=grader(calls := []))
    assert [x.rejected for x in d] == ["verify:wrong_answer", None, "not_first", "not_first", "truncated",
                                       "not_first"]
    d = decide(samples[:2], select=Select(), filters=Filters(), verify_kind="none", verify=grader(calls := []))
    assert calls == [] and all(x.verdict is None and x.rejected is None for x in d)


def test_samples_the_engine_rejected_are_never_verified():
    refused = Completion(text="", token_ids=None, num_tokens=0, finish_reason="rejected", rejected="http_400",
                         error="HTTP 400: too long")
    calls: list = []
    d = decide([refused, C("<think>a</think> right", 5)], select=Select(mode="all-correct"), filters=Filters(),
               verify_kind="math", verify=grader(calls))
    assert [x.rejected for x in d] == ["engine:http_400", None] and len(calls) == 1


def test_closed_think():
    assert has_closed_think("<think>reason</think>answer")
    assert has_closed_think("reason</think>answer")  # the template opened the block
    assert not has_closed_think("<think>reason, never closed")
    assert not has_closed_think("<think></think>answer") and not has_closed_think("</think><think>x")


def test_store_commits_and_recovers_from_torn_writes(tmp_path):
    store = ShardStore(tmp_path / "s")
    store.commit(["a", "b"], [{"promptId": "a"}, {"promptId": "b"}], {"n": 1})
    store.commit(["c"], [{"promptId": "c"}], {"n": 2})
    # a kill after the samples of batch 3 but inside its commit line, plus stray bytes after it
    with open(store.samples_path, "ab") as f:
        f.write(b'{"promptId": "d"}\n{"promptId": "e"')
    with open(store.commits_path, "ab") as f:
        f.write(b'{"batch": 2, "prompts": ["d", "e"], "en')
    again = ShardStore(tmp_path / "s")
    assert again.done_prompts == {"a", "b", "c"} and len(again.commits) == 2
    assert [r["promptId"] for r in again.read_samples()] == ["a", "b", "c"]
    again.commit(["d"], [{"promptId": "d"}], {"n": 3})
    assert [json.loads(line)["batch"] for line in again.commits_path.read_text().splitlines()] == [0, 1, 2]
    assert not again.complete
    again.mark_complete({"ok": True})
    assert ShardStore(tmp_path / "s").complete


def test_reader_of_a_shard_being_written_changes_nothing(tmp_path):
    """Worker 0 reads every shard (progress, publish) while other pods write theirs: a batch half written
    by its owner is invisible to the reader and left exactly as it is (no truncation)."""
    owner = ShardStore(tmp_path / "s")
    owner.commit(["a"], [{"promptId": "a"}], {"n": 1})
    with open(owner.samples_path, "ab") as f:  # the owner is between its samples' fsync and its commit line
        f.write(b'{"promptId": "b"}\n')
    samples, commits = owner.samples_path.read_bytes(), owner.commits_path.read_bytes()
    reader = ShardStore(tmp_path / "s", writer=False)
    assert reader.done_prompts == {"a"} and [r["promptId"] for r in reader.read_samples()] == ["a"]
    assert owner.samples_path.read_bytes() == samples and owner.commits_path.read_bytes() == commits
    with pytest.raises(RuntimeError, match="read-only"):
        reader.commit(["c"], [], {})
    assert ShardStore(tmp_path / "missing", writer=False).commits == []
    assert not (tmp_path / "missing").exists()


def _run_for(tmp_path, rank: int, world: int, shards: int, prompts: int = 200):
    """The stage's own view of its shards for worker ``rank`` of ``world`` (no engine is opened)."""
    from branchmerge.api.validation import parse_resource
    from branchmerge.trainer.progress import Progress
    from branchmerge.trainer.stage import StageContext

    data = tmp_path / "prompts.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"id": f"p{i}", "q": str(i)}) + "\n" for i in range(prompts)))
    spec = {"teacher": {"engine": {"name": "openai", "endpoint": {"baseUrl": "http://127.0.0.1:9", "model": "t"}}},
            "prompts": {"dataset": {"uri": data.as_uri()}, "idField": "id"}, "template": "{{q}}",
            "shards": shards, "output": {"uri": (tmp_path / "out").as_uri()}}
    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "TeacherGen", "metadata": {"name": "tg"}, "spec": spec}
    ctx = StageContext(parse_resource(doc), spec["output"]["uri"], tmp_path / "out", Progress(enabled=False),
                       rank, world)
    return teachergen.TeacherGenSession(ctx)


def test_32_shards_over_4_workers_run_every_shard_exactly_once(tmp_path):
    assert teachergen.assigned_shards(1, 4, 32) == [1, 5, 9, 13, 17, 21, 25, 29]
    # worker i of W (RANK/WORLD_SIZE, as the operator sets them) takes i, i + W, ...
    taken = [s for rank in range(4) for s in _run_for(tmp_path, rank, 4, 32).my_shards()]
    assert sorted(taken) == list(range(32))
    assert _run_for(tmp_path, 0, 1, 32).my_shards() == list(range(32))  # one local process: everything
    assert sorted(s for r in range(5) for s in teachergen.assigned_shards(r, 5, 3)) == [0, 1, 2]
    with pytest.raises(InvalidInput, match="RANK"):
        teachergen.assigned_shards(4, 4, 32)


def test_teachergen_pods_get_rank_and_world_size_and_no_peer_wait():
    """An Indexed Job of workers that share files, not a rendezvous: no wait-for-peers init container;
    RANK is the completion index and WORLD_SIZE the pod count (what the stage reads)."""
    from branchmerge.operator.pods.distributed import COMPLETION_INDEX_ANNOTATION
    from branchmerge.operator.pods.job import build_job
    from branchmerge.operator.options import OperatorOptions
    from branchmerge.operator.plan import target

    opts = OperatorOptions(image="trainer:1")
    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "TeacherGen",
           "metadata": {"name": "tg", "namespace": "ns", "uid": "u", "generation": 1, "resourceVersion": "1"},
           "spec": {"teacher": {"model": {"uri": "pvc://models/teacher"}},
                    "prompts": {"dataset": {"uri": "pvc://data/prompts.jsonl"}}, "shards": 32,
                    "output": {"uri": "pvc://data/traces"}, "resources": {"nodes": 4, "gpusPerNode": 8}}}
    job = build_job(target(doc, {}, opts), 1, opts)
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    assert "wait-for-peers" not in [c["name"] for c in pod.get("initContainers", [])]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}
    assert env["WORLD_SIZE"] == "4"
    assert env["RANK"] == {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}
