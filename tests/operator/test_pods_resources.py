"""What a stage pod asks of its node (operator/pods/resources.py): requests and limits, QoS, /dev/shm, threads."""
from __future__ import annotations

import pytest

from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import target
from branchmerge.operator.pods.job import build_job
from branchmerge.operator.pods.resources import quantity, shm_size

from .kube_objects import EVAL_SPEC, MERGE_SPEC, SFT_SPEC, cr

OPTS = OperatorOptions(image="trainer:1", hf_token_secret="hf-secret")


def run_of(kind, spec, opts=OPTS):
    run = target(cr(kind, "x", spec), {}, opts)
    assert not hasattr(run, "reason"), run
    return run


def pod_of(kind, spec, opts=OPTS):
    return build_job(run_of(kind, spec, opts), 1, opts)["spec"]["template"]["spec"]


@pytest.mark.parametrize("resources, threads", [
    ({}, None), ({"cpu": "500m"}, "1"), ({"cpu": "2500m"}, "2"), ({"cpu": "8"}, "8"),
    ({"cpu": "16", "gpusPerNode": 4}, "4"),  # torchrun: 4 ranks share the pod's CPUs
    ({"cpu": "8", "env": [{"name": "OMP_NUM_THREADS", "value": "3"}]}, "3"),  # the user's setting wins
])
def test_thread_count_follows_the_cpu_amount(resources, threads):
    run = run_of("BranchSFT", {**SFT_SPEC, "resources": resources})
    env = [e for e in build_job(run, 1, OPTS)["spec"]["template"]["spec"]["containers"][0]["env"]
           if e["name"] == "OMP_NUM_THREADS"]
    assert [e["value"] for e in env] == ([threads] if threads else [])


def test_shm_defaults_from_gpu_count():
    assert shm_size({"gpusPerNode": 8}) == "64Gi" and shm_size({}) == "1Gi" and shm_size({"shmSize": "2Gi"}) == "2Gi"


def qos_class(pod: dict) -> str:
    """The pod's QoS class as the kubelet computes it (init containers included; GPUs do not count)."""
    containers = (pod.get("initContainers") or []) + pod["containers"]
    amounts = [(c.get("resources") or {}) for c in containers]
    if not any(r.get(side, {}).get(res) for r in amounts for side in ("requests", "limits") for res in ("cpu", "memory")):
        return "BestEffort"
    for r in amounts:
        limits, requests = r.get("limits", {}), r.get("requests", {})
        for res in ("cpu", "memory"):
            if res not in limits or requests.get(res, limits[res]) != limits[res]:
                return "Burstable"
    return "Guaranteed"


def test_stage_pods_without_resources_get_default_requests_and_are_not_best_effort():
    merge = pod_of("Merge", MERGE_SPEC)  # no spec.resources at all
    (main,) = merge["containers"]
    # a request (1Gi of /dev/shm on top of the default 2Gi), no limit: Burstable, free to use idle capacity
    assert main["resources"] == {"requests": {"cpu": "500m", "memory": "3Gi"}}
    assert qos_class(merge) == "Burstable"

    sft = pod_of("BranchSFT", SFT_SPEC)  # 4 GPUs per pod, an explicit 16Gi /dev/shm, no cpu or memory
    main = sft["containers"][0]
    assert main["resources"]["requests"] == {"cpu": "500m", "memory": "18Gi", "nvidia.com/gpu": "4"}
    assert main["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert qos_class(sft) == "Burstable"
    for init in sft["initContainers"]:  # every stage container requests, none holds a GPU
        assert init["resources"] == {"requests": {"cpu": "500m", "memory": "18Gi"}}


def test_user_set_cpu_and_memory_win_over_the_defaults_and_make_the_pod_guaranteed():
    spec = {**SFT_SPEC, "resources": {"nodes": 2, "gpusPerNode": 4, "cpu": "32", "memory": "256Gi"}}
    pod = pod_of("BranchSFT", spec)
    main = pod["containers"][0]
    assert main["resources"]["requests"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "4"}
    assert main["resources"]["limits"] == main["resources"]["requests"]
    for init in pod["initContainers"]:
        assert init["resources"] == {"requests": {"cpu": "32", "memory": "256Gi"},
                                     "limits": {"cpu": "32", "memory": "256Gi"}}
    assert qos_class(pod) == "Guaranteed"
    # only one of the two set: the other is the default request, the set one is request and limit
    main = pod_of("Merge", {**MERGE_SPEC, "resources": {"memory": "8Gi"}})["containers"][0]
    assert main["resources"] == {"requests": {"cpu": "500m", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}


def test_default_requests_are_operator_options():
    opts = OperatorOptions(image="trainer:1", default_cpu_request="2", default_memory_request="6Gi")
    main = pod_of("Merge", MERGE_SPEC, opts)["containers"][0]
    assert main["resources"] == {"requests": {"cpu": "2", "memory": "7Gi"}}
    off = OperatorOptions(image="trainer:1", default_cpu_request=None, default_memory_request=None)
    assert "resources" not in pod_of("Merge", MERGE_SPEC, off)["containers"][0]


def test_shm_default_leaves_half_the_memory_limit_to_the_stage():
    """/dev/shm is a memory-backed emptyDir: its pages are charged to the pod, so they count against
    spec.resources.memory (the limit). A default of 8Gi per GPU in a 16Gi pod would let NCCL alone fill it."""
    assert shm_size({"gpusPerNode": 8, "memory": "32Gi"}) == "16Gi"
    assert shm_size({"gpusPerNode": 1, "memory": "1000Mi"}) == "500Mi"
    assert shm_size({"gpusPerNode": 8, "memory": "1Ti"}) == "64Gi"  # a large limit: the per-GPU default
    assert shm_size({"gpusPerNode": 8, "memory": "32Gi", "shmSize": "24Gi"}) == "24Gi"  # explicit wins
    pod = pod_of("Eval", {**EVAL_SPEC, "resources": {"gpusPerNode": 4, "memory": "16Gi"}})
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}


def test_quantities():
    assert quantity("500m") == quantity("0.5") and quantity("1Gi") == 2**30 and quantity("1.5G") == 1_500_000_000
    with pytest.raises(ValueError):
        quantity("12Qi")
