"""Ranks across pods (operator/pods/distributed.py). TeacherGen and Eval with spec.resources.nodes > 1: an
Indexed Job of data-parallel workers, each pod with RANK = its completion index and WORLD_SIZE = the pod count,
sharing files rather than a rendezvous. Multi-node BranchSFT (torchrun) is in test_pods_job.py."""
from __future__ import annotations

from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import target
from branchmerge.operator.pods.distributed import COMPLETION_INDEX_ANNOTATION, build_service
from branchmerge.operator.pods.job import build_job

from .kube_objects import EVAL_SPEC, TG_SPEC, cr

OPTS = OperatorOptions(image="trainer:1")


def _job(resources: dict) -> dict:
    run = target(cr("Eval", "ev", {**EVAL_SPEC, "resources": resources}), {}, OPTS)
    assert not hasattr(run, "reason"), run
    return build_job(run, 1, OPTS)


def test_eval_workers_are_an_indexed_job_with_rank_and_world_size():
    job = _job({"nodes": 3, "gpusPerNode": 8})
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    pod = job["spec"]["template"]["spec"]
    assert "wait-for-peers" not in [c["name"] for c in pod.get("initContainers", [])]
    main = pod["containers"][0]
    assert main["command"][:3] == ["branchmerge", "stage", "eval"]  # one process per pod, no torchrun
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in main["env"]}
    assert env["WORLD_SIZE"] == "3"
    assert env["RANK"] == {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}


def test_single_pod_eval_is_unchanged():
    job = _job({"gpusPerNode": 8})
    assert "completionMode" not in job["spec"] and job["spec"]["completions"] == 1
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1"


def test_data_parallel_teachergen_ranks_from_completion_index():
    run = target(cr("TeacherGen", "tg", TG_SPEC), {}, OPTS)
    job = build_job(run, 3, OPTS)
    assert job["spec"]["completionMode"] == "Indexed" and job["metadata"]["name"].endswith("-3")
    main = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in main["env"]}
    assert main["command"][0] == "branchmerge" and env["WORLD_SIZE"] == "2"
    assert "fieldRef" in env["RANK"]
    assert build_service(run, 3)["metadata"]["name"] == job["metadata"]["name"]
