"""kopf running against the kmock emulator: a 4-CR pipeline created at once, Jobs driven like a kubelet
would (success, retryable and permanent failures, suspend/resume, deletion); children, status, Events and
the scraped metrics are asserted."""
from __future__ import annotations

import pytest

from branchmerge.operator.emulator import Api, EmulatorThread, OperatorThread
from branchmerge.operator.options import OperatorOptions

from testcluster.wait import wait_for

from .emulator_driver import events_for, finish, jobs_of, manifest, phase, ready_reason, result, scrape, start
from .kube_objects import MERGE_SPEC, NS, cr, pipeline

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster():
    with EmulatorThread() as emu:
        api = Api(emu.url)
        with OperatorThread(emu.url, OperatorOptions(), namespaces=[NS]) as op:
            yield api, op, emu


def test_pipeline_of_four_created_at_once(cluster):
    api, op, _ = cluster
    docs = pipeline()
    docs[1]["spec"]["runPolicy"] = {"backoffLimit": 2, "backoffSeconds": 3}  # long enough to see Retrying
    for doc in docs:
        api.create(manifest(doc), NS)

    gen_job = wait_for(lambda: jobs_of(api, "gen"), what="gen's Job")[0]
    for kind, name in (("BranchSFT", "sft"), ("Merge", "merge"), ("Eval", "eval")):
        wait_for(lambda: ready_reason(api, kind, name) == "UpstreamNotReady", what=f"{name} waiting")
        assert not jobs_of(api, name)
    cms = [c for c in api.list("ConfigMap", NS) if c["metadata"]["labels"].get("branchmerge.dev/name") == "gen"]
    assert len(cms) == 1 and cms[0]["metadata"]["ownerReferences"][0]["kind"] == "TeacherGen"
    start(api, gen_job)
    wait_for(lambda: ready_reason(api, "TeacherGen", "gen") == "Running")

    # gen succeeds -> sft starts by itself with the upstream's output as its data
    finish(api, gen_job, True, message=result("pvc://data/traces", samplesKept=7, samplesRejected=3,
                                                 tokensPerSecond=123.5))
    wait_for(lambda: phase(api, "TeacherGen", "gen") == "Succeeded")
    gen = api.get("TeacherGen", NS, "gen")
    assert gen["status"]["output"] == {"uri": "pvc://data/traces", "digest": "sha256:feed"}
    assert gen["status"]["metrics"]["samplesKept"] == 7 and gen["status"]["attempts"] == 1
    sft_job = wait_for(lambda: jobs_of(api, "sft"), what="sft's Job")[0]
    cm = [c for c in api.list("ConfigMap", NS) if c["metadata"]["labels"].get("branchmerge.dev/name") == "sft"][0]
    assert "pvc://data/traces" in cm["data"]["spec.yaml"]

    # sft: OOM-killed (retryable) -> attempt 2 after the backoff -> succeeds
    finish(api, sft_job, False, exit_code=137, reason="OOMKilled")
    wait_for(lambda: ready_reason(api, "BranchSFT", "sft") == "Retrying")
    jobs = wait_for(lambda: len(jobs_of(api, "sft")) == 2 and jobs_of(api, "sft"), timeout=10, what="attempt 2")
    assert jobs[1]["metadata"]["name"].endswith("-2")
    finish(api, jobs[1], True, message=result("pvc://models/sft", loss=0.25))
    wait_for(lambda: phase(api, "BranchSFT", "sft") == "Succeeded")
    assert api.get("BranchSFT", NS, "sft")["status"]["attempts"] == 2

    merge_job = wait_for(lambda: jobs_of(api, "merge"))[0]
    finish(api, merge_job, True, message=result("pvc://models/merged"))
    eval_job = wait_for(lambda: jobs_of(api, "eval"))[0]
    finish(api, eval_job, True, message=result("pvc://results/eval", score=0.5, **{"benchmarks.aime.pass1": 0.5}))
    wait_for(lambda: phase(api, "Eval", "eval") == "Succeeded")

    assert events_for(api, "gen") == ["Started", "Running", "Succeeded"]
    assert events_for(api, "sft") == ["UpstreamNotReady", "Started", "Retrying", "Started", "Succeeded"]
    assert events_for(api, "eval")[0] == "UpstreamNotReady" and events_for(api, "eval")[-1] == "Succeeded"
    ev = api.get("Eval", NS, "eval")["status"]
    assert [c["status"] for c in ev["conditions"] if c["type"] in ("Ready", "Reconciling", "Stalled")] == \
        ["True", "False", "False"]
    assert ev["observedGeneration"] == 1 and ev["startTime"] and ev["completionTime"]

    m = wait_for(lambda: (s := scrape(op.metrics_url)) and
                 s.get('branchmerge_resources{kind="Eval",phase="Succeeded"}') == 1 and s, what="metrics")
    assert m['branchmerge_resources{kind="BranchSFT",phase="Succeeded"}'] == 1
    assert m['branchmerge_retries_total{kind="BranchSFT",reason="OOMKilled"}'] == 1
    assert m['branchmerge_stage_duration_seconds_count{kind="Merge",result="Succeeded"}'] == 1
    assert m['branchmerge_eval_score{benchmark="aime",name="eval",namespace="ns"}'] == 0.5
    assert m['branchmerge_teachergen_tokens_per_second{name="gen",namespace="ns"}'] == 123.5
    assert m['branchmerge_teachergen_acceptance_ratio{name="gen",namespace="ns"}'] == 0.7
    assert m['branchmerge_sft_loss{name="sft",namespace="ns"}'] == 0.25
    assert sum(v for k, v in m.items() if k.startswith("branchmerge_reconcile_errors_total")) == 0

    # deletion: the CR goes, its children are garbage-collected, the downstream notices the missing upstream
    api.delete("Merge", NS, "merge")
    wait_for(lambda: not jobs_of(api, "merge"), what="GC of merge's Job")
    assert not [c for c in api.list("ConfigMap", NS) if c["metadata"]["labels"].get("branchmerge.dev/name") == "merge"]
    wait_for(lambda: scrape(op.metrics_url).get('branchmerge_resources{kind="Merge",phase="Succeeded"}') == 0)
    assert phase(api, "Eval", "eval") == "Succeeded"  # a finished run stays finished


def test_permanent_failure_suspend_resume_and_spec_change(cluster):
    api, op, _ = cluster
    api.create(manifest(cr("Merge", "bad", MERGE_SPEC)), NS)
    api.create(manifest(cr("Merge", "pausable", MERGE_SPEC)), NS)
    bad = wait_for(lambda: jobs_of(api, "bad"))[0]
    finish(api, bad, False, exit_code=2, message='{"phase":"Failed","error":"spec.models[0].uri: not a model"}')
    wait_for(lambda: phase(api, "Merge", "bad") == "Failed")
    assert ready_reason(api, "Merge", "bad") == "InvalidSpec" and len(jobs_of(api, "bad")) == 1
    assert events_for(api, "bad")[-1] == "InvalidSpec"
    warn = [e for e in api.list("Event", NS) if e["reason"] == "InvalidSpec"][0]
    assert warn["type"] == "Warning" and "not a model" in warn["message"]

    job = wait_for(lambda: jobs_of(api, "pausable"))[0]
    start(api, job)
    wait_for(lambda: ready_reason(api, "Merge", "pausable") == "Running")
    api.patch("Merge", NS, "pausable", {"spec": {"resources": {"suspend": True}}})
    wait_for(lambda: api.get("Job", NS, job["metadata"]["name"])["spec"].get("suspend") is True, what="suspend")
    wait_for(lambda: phase(api, "Merge", "pausable") == "Suspended")
    api.patch("Merge", NS, "pausable", {"spec": {"resources": {"suspend": False}}})
    wait_for(lambda: api.get("Job", NS, job["metadata"]["name"])["spec"].get("suspend") is False, what="resume")
    wait_for(lambda: phase(api, "Merge", "pausable") == "Running")
    assert len(jobs_of(api, "pausable")) == 1  # suspend is not a new run
    cr_now = api.get("Merge", NS, "pausable")
    assert cr_now["status"]["observedGeneration"] == cr_now["metadata"]["generation"] == 3
    assert cr_now["spec"] == {**MERGE_SPEC, "resources": {"suspend": False}}  # never mutated by the operator

    # an edit of what the run computes supersedes the running attempt with a new run
    api.patch("Merge", NS, "pausable", {"spec": {"parameters": {"normalize": False}}})
    wait_for(lambda: api.get("Job", NS, job["metadata"]["name"]) is None, what="old run's Job deleted")
    new = wait_for(lambda: jobs_of(api, "pausable"))
    assert new[0]["metadata"]["labels"]["branchmerge.dev/run"] != job["metadata"]["labels"]["branchmerge.dev/run"]
    assert events_for(api, "pausable") == ["Started", "Running", "Suspended", "Running", "Started"]


def test_cluster_wide_mode_serves_every_namespace():
    with EmulatorThread() as emu:
        api = Api(emu.url)
        with OperatorThread(emu.url, OperatorOptions(), clusterwide=True, metrics_port=None):
            for ns in ("team-a", "team-b"):
                doc = manifest(cr("Merge", f"m-{ns}", MERGE_SPEC))
                doc["metadata"]["namespace"] = ns
                api.create(doc, ns)
            for ns in ("team-a", "team-b"):
                wait_for(lambda: [j for j in api.list("Job", ns)
                                  if j["metadata"]["labels"]["branchmerge.dev/name"] == f"m-{ns}"],
                         what=f"Job in {ns}")
                assert api.get("Merge", ns, f"m-{ns}")["status"]["phase"] == "Running"
