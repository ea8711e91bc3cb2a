"""status.cost on Kubernetes: GPU-seconds from the pods' GPU requests and container start/finish times,
CPU and memory from the stage's termination message, summed over attempts; the cost counters count each
finished run once."""
from __future__ import annotations

import copy
import json

import pytest

from branchmerge.api.common import Status
from branchmerge.operator.emulator import Api, EmulatorThread, OperatorThread
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import Observed, plan

from testcluster.wait import wait_for

from .emulator_driver import jobs_of, manifest, phase, scrape
from .kube_objects import NS, SFT_SPEC, cr, finish_job

OPTS = OperatorOptions()
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def at(seconds: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(T0 + seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ran_pod(job: dict, index: int, start: float, end: float, *, exit_code: int = 0, message: dict | None = None) -> dict:
    """A pod of ``job`` as the kubelet leaves it: the Job's pod template (so the operator's own GPU
    requests), its stage container terminated after running from ``start`` to ``end`` (seconds after T0)."""
    spec = copy.deepcopy(job["spec"]["template"]["spec"])
    term = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": at(start), "finishedAt": at(end), "message": json.dumps(message) if message else ""}
    name = job["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{name}-{index}-x", "namespace": NS, "labels": {"branchmerge.dev/job": name},
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": spec,
            "status": {"phase": "Succeeded" if exit_code == 0 else "Failed",
                       "containerStatuses": [{"name": "stage", "state": {"terminated": term}}]}}


def reported(cpu: float, peak: int, ok: bool = True) -> dict:
    """Rank 0's termination message (trainer/stage.py): its own measurement of its process tree."""
    cost = {"wallSeconds": 1.0, "cpuSeconds": cpu, "peakMemoryBytes": peak, "gpus": 4, "gpuSeconds": 4.0}
    if ok:
        return {"phase": "Succeeded", "outputUri": "pvc://models/sft", "digest": "sha256:abc", "metrics": {},
                "cost": cost}
    return {"phase": "Failed", "error": "NCCL timeout", "exitCode": 3, "cost": cost}


def step(doc, observed=None, now=T0):
    p = plan(doc, {}, observed or Observed(), OPTS, now)
    doc["status"] = p.status
    return p


def test_two_pod_sft_cost_sums_pods_and_attempts():
    # SFT_SPEC: nodes 2 x gpusPerNode 4
    doc = cr("BranchSFT", "sft", {**SFT_SPEC, "runPolicy": {"backoffLimit": 2, "backoffSeconds": 10}})
    job1 = [c for c in step(doc).create if c["kind"] == "Job"][0]
    limits = job1["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "4"
    # attempt 1: pod 0 ran 100 s, pod 1 ran 90 s (started 5 s later), then failed retryably
    pods1 = [ran_pod(job1, 0, 10, 110, exit_code=3, message=reported(300.0, 2 * 2**30, ok=False)),
             ran_pod(job1, 1, 15, 105, exit_code=1)]
    observed = Observed(jobs=[finish_job(job1, False, when=at(110))], pods={job1["metadata"]["name"]: pods1})
    p = step(doc, observed, now=T0 + 111)
    assert p.retried and not p.create  # waiting out the backoff
    first = {"wallSeconds": 100.0, "cpuSeconds": 300.0, "peakMemoryBytes": 2 * 2**30, "gpus": 8,
             "gpuSeconds": 4 * 100 + 4 * 90, "attempts": 1}
    assert p.status["cost"] == first
    # reconciles during the wait and the one that starts attempt 2 see the same finished attempt: no double count
    assert step(doc, observed, now=T0 + 115).status["cost"] == first
    p = step(doc, observed, now=T0 + 121)
    assert p.status["attempts"] == 2 and p.status["cost"] == first
    job2 = [c for c in p.create if c["kind"] == "Job"][0]

    # attempt 2: 1000 s and 1010 s, succeeds
    pods2 = [ran_pod(job2, 0, 200, 1200, message=reported(5000.0, 3 * 2**30)), ran_pod(job2, 1, 195, 1205)]
    jobs = [finish_job(job1, False, when=at(110)), finish_job(job2, True, when=at(1205))]
    p = step(doc, Observed(jobs=jobs, pods={job2["metadata"]["name"]: pods2}), now=T0 + 1206)
    assert p.status["phase"] == "Succeeded" and p.finished == "Succeeded"
    total = {"wallSeconds": 100.0 + 1010.0, "cpuSeconds": 5300.0, "peakMemoryBytes": 3 * 2**30, "gpus": 8,
             "gpuSeconds": 760.0 + 4 * 1000 + 4 * 1010, "attempts": 2}
    assert p.status["cost"] == total
    Status.model_validate(p.status)
    # the run's ConfigMap records it: an operator restarted after the Jobs expired shows the same cost
    record = json.loads(p.patch[0][2]["metadata"]["annotations"]["branchmerge.dev/result"])
    assert record["cost"] == total
    doc["status"].pop("cost")
    cm = {"metadata": {"annotations": p.patch[0][2]["metadata"]["annotations"]}}
    doc["status"]["phase"] = "Running"  # as if the restart came before the status write
    assert step(doc, Observed(jobs=[], configmap=cm), now=T0 + 2000).status["cost"] == total


def test_a_spec_edit_starts_the_cost_of_the_new_run_at_zero():
    doc = cr("BranchSFT", "sft", SFT_SPEC)
    job1 = [c for c in step(doc).create if c["kind"] == "Job"][0]
    pods = [ran_pod(job1, 0, 0, 50, message=reported(10.0, 2**30)), ran_pod(job1, 1, 0, 50)]
    p = step(doc, Observed(jobs=[finish_job(job1, True, when=at(50))], pods={job1["metadata"]["name"]: pods}))
    assert p.status["cost"]["gpuSeconds"] == 400.0
    doc["spec"]["training"]["globalBatchSize"] = 16
    doc["metadata"]["generation"] = 2
    p = step(doc, Observed(jobs=[finish_job(job1, True, when=at(50))]), now=T0 + 60)
    assert p.status["phase"] == "Running" and "cost" not in p.status


@pytest.mark.timeout(120)
def test_cost_reaches_status_and_counters_once_through_the_operator():
    """Through kopf and the emulated API server: the status write passes the CRD's schema and the counters
    add a finished run once, whatever reconciles follow."""
    with EmulatorThread() as emu:
        api = Api(emu.url)
        with OperatorThread(emu.url, OperatorOptions(), namespaces=[NS]) as op:
            api.create(manifest(cr("BranchSFT", "sft", SFT_SPEC)), NS)
            job = wait_for(lambda: jobs_of(api, "sft"), what="sft's Job")[0]
            name = job["metadata"]["name"]
            for pod in (ran_pod(job, 0, 0, 3600, message=reported(7200.0, 2**31)), ran_pod(job, 1, 0, 1800)):
                api.create(pod, NS)
            api.patch("Job", NS, name, {"status": finish_job(job, True, when=at(3600))["status"]}, sub="status")
            wait_for(lambda: phase(api, "BranchSFT", "sft") == "Succeeded", what="sft succeeded")
            cost = api.get("BranchSFT", NS, "sft")["status"]["cost"]
            assert cost == {"wallSeconds": 3600.0, "cpuSeconds": 7200.0, "peakMemoryBytes": 2**31, "gpus": 8,
                            "gpuSeconds": 4 * 3600 + 4 * 1800, "attempts": 1}
            # more reconciles of the finished CR (an annotation edit is an event) count nothing again
            api.patch("BranchSFT", NS, "sft", {"metadata": {"annotations": {"touch": "1"}}})
            m = wait_for(lambda: (s := scrape(op.metrics_url)) and
                         s.get('branchmerge_reconciles_total{kind="BranchSFT"}', 0) >= 3 and s, what="metrics")
            assert m['branchmerge_stage_gpu_seconds_total{kind="BranchSFT"}'] == 21600.0
            assert m['branchmerge_stage_cpu_seconds_total{kind="BranchSFT"}'] == 7200.0
            assert m['branchmerge_stage_wall_seconds_total{kind="BranchSFT"}'] == 3600.0


def test_the_termination_message_keeps_the_cost_when_metrics_do_not_fit(tmp_path, monkeypatch):
    """The stage's compact message (at most 4096 bytes, what Kubernetes keeps) drops its metrics first; the
    cost stays, and the operator reads it back from the pod."""
    from branchmerge.operator.plan import attempt_cost
    from branchmerge.trainer.stage import TERMINATION_LOG_LIMIT, _write_termination_log, process_cost

    log = tmp_path / "termination-log"
    monkeypatch.setenv("BRANCHMERGE_TERMINATION_LOG", str(log))
    cost = process_cost(12.5)
    assert cost["wallSeconds"] == 12.5 and cost["cpuSeconds"] > 0 and cost["peakMemoryBytes"] > 2**20
    assert cost["gpus"] == 0 and cost["gpuSeconds"] == 0  # this machine has no GPU
    _write_termination_log({"phase": "Succeeded", "outputUri": "pvc://m/x", "digest": "sha256:abc",
                            "metrics": {f"m{i}": "x" * 40 for i in range(200)}, "cost": cost})
    text = log.read_text()
    assert len(text.encode()) <= TERMINATION_LOG_LIMIT and json.loads(text)["metrics"] == {}
    pod = {"metadata": {"name": "p", "annotations": {}}, "spec": {"containers": [{"name": "stage"}]},
           "status": {"containerStatuses": [{"name": "stage", "state": {"terminated": {
               "exitCode": 0, "message": text, "startedAt": at(0), "finishedAt": at(14)}}}]}}
    assert attempt_cost([pod]) == {**cost, "wallSeconds": 14.0, "gpus": 0, "gpuSeconds": 0.0, "attempts": 1}
