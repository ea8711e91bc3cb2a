"""The operator's small runtime pieces: work queue, cache, metrics shapes, the pinned-result rule."""
from __future__ import annotations

import asyncio

from branchmerge.operator.metrics import OperatorMetrics, benchmark_score
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import Observed, plan, upstream_view
from branchmerge.operator.watch_cache import WatchCache, upstream_keys
from branchmerge.operator.workqueue import WorkQueue

from .kube_objects import cr, pipeline


def test_workqueue_dedups_serialises_and_delays():
    async def scenario():
        q = WorkQueue()
        q.add("a"), q.add("a"), q.add("b")
        assert len(q) == 2
        key = await q.get()
        q.add(key)  # added while processing: processed once more afterwards, not concurrently
        assert key == "a" and len(q) == 2
        assert await q.get() == "b"
        q.done("b")
        q.done("a")
        assert await q.get() == "a"
        q.done("a")
        q.add_after("c", 0.05)
        q.add_after("c", 10)  # the earlier schedule wins
        t = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(q.get(), 2) == "c"
        assert asyncio.get_running_loop().time() - t < 1
        q.close()

    asyncio.run(scenario())


def test_store_ignores_stale_events_and_finds_downstreams():
    s = WatchCache()
    gen, sft, merge, _ = pipeline()
    gen["metadata"]["resourceVersion"] = "5"
    assert s.put_cr(gen) == (True, True)
    stale = {**gen, "metadata": {**gen["metadata"], "resourceVersion": "4"}, "status": {"phase": "Running"}}
    assert s.put_cr(stale) == (False, False) and s.crs[("ns", "TeacherGen", "gen")] is gen
    assert s.put_cr(dict(gen)) == (False, False)  # the watch echo of a version already stored
    newer = {**gen, "metadata": {**gen["metadata"], "resourceVersion": "6"}, "status": {"phase": "Running"}}
    assert s.put_cr(newer) == (True, True)
    s.put_cr(sft), s.put_cr(merge)
    assert s.downstreams("ns", "TeacherGen", "gen") == [("ns", "BranchSFT", "sft")]
    assert [c["metadata"]["name"] for c in s.upstreams_of(("ns", "Merge", "merge"))] == ["sft"]
    assert upstream_keys(merge["spec"]) == {("BranchSFT", "sft")}
    job = {"metadata": {"name": "j", "namespace": "ns", "resourceVersion": "9", "labels": {
        "app.kubernetes.io/managed-by": "branchmerge-operator", "branchmerge.dev/kind": "Merge",
        "branchmerge.dev/name": "merge"}}}
    assert s.put_job(job) == ("ns", "Merge", "merge") and s.jobs_of(("ns", "Merge", "merge")) == [job]
    assert s.put_job(dict(job)) is None  # same version again: nothing to do
    assert s.put_job({"metadata": {"name": "other", "namespace": "ns", "labels": {}}}) is None


def test_eval_score_shapes_and_series_removal():
    assert benchmark_score({"benchmarks": {"aime": {"pass1": 0.4}}}, "aime") == 0.4
    assert benchmark_score({"pass1/aime": 0.3}, "aime") == 0.3
    assert benchmark_score({"benchmarks.aime.pass1": 0.2}, "aime") == 0.2
    assert benchmark_score({"benchmarks.gpqa.pass1": 0.2}, "aime") is None
    m = OperatorMetrics(lambda: [])
    ev = cr("Eval", "e", {"benchmarks": [{"name": "aime"}]}, status={"metrics": {"score": 0.5, "pass1/aime": 0.5}})
    m.observe_cr(ev)
    assert m.registry.get_sample_value("branchmerge_eval_score", {"namespace": "ns", "name": "e",
                                                                  "benchmark": "aime"}) == 0.5
    m.forget_cr("ns", "e")
    assert m.registry.get_sample_value("branchmerge_eval_score", {"namespace": "ns", "name": "e",
                                                                  "benchmark": "aime"}) is None


def test_a_finished_run_stays_finished_when_its_upstream_goes():
    _, sft, _, _ = pipeline()
    sft["status"] = {"phase": "Succeeded", "observedGeneration": 1, "conditions": []}
    p = plan(sft, upstream_view([]), Observed(), OperatorOptions(), 0.0)
    assert p.status == sft["status"] and not p.create and not p.events
    sft["metadata"]["generation"] = 2  # ... but an edit of the CR waits for it again
    p = plan(sft, upstream_view([]), Observed(), OperatorOptions(), 0.0)
    assert p.status["phase"] == "Waiting"
