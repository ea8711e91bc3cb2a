"""Job/Service/ConfigMap builders for each kind and mode (plain dicts, no cluster)."""
from __future__ import annotations

import yaml

import pytest

from branchmerge.operator.builders import (build_children, build_configmap, build_job,
                                           build_service, quantity, shm_size)
from branchmerge.operator.naming import KUEUE_QUEUE, MAX_CHILD_NAME, child_name
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import target

from opfixtures import EVAL_SPEC, MERGE_SPEC, SFT_SPEC, TG_SPEC, cr

OPTS = OperatorOptions(image="trainer:1", hf_token_secret="hf-secret")


def run_of(kind, spec, opts=OPTS, **meta):
    run = target(cr(kind, "x", spec, **meta), {}, opts)
    assert not hasattr(run, "reason"), run
    return run


def env_of(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_names_are_deterministic_dns_labels_within_limit():
    assert child_name("merge", "0123456789", 2) == "merge-01234567-2"
    long = child_name("a" * 63, "0123456789", 12)
    assert len(long) <= MAX_CHILD_NAME and long.endswith("-01234567-12")
    assert child_name("a" * 63, "0123456789", 12) == long
    assert child_name("a" * 62 + "b", "0123456789", 12) != long  # the digest keeps long names apart
    assert child_name("1st.merge", "0123456789")[0].isalpha() and "." not in child_name("1st.merge", "0123456789")


def test_single_pod_merge_job_security_and_volumes():
    run = run_of("Merge", MERGE_SPEC)
    job = build_job(run, 1, OPTS)
    assert job["metadata"]["name"] == run.job_name(1) and job["spec"]["backoffLimit"] == 0
    assert "completionMode" not in job["spec"] and job["spec"]["completions"] == 1
    owner = job["metadata"]["ownerReferences"][0]
    assert owner == {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge", "name": "x", "uid": "uid-x",
                     "controller": True, "blockOwnerDeletion": True}
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    (main,) = pod["containers"]
    sc = main["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert main["command"] == ["branchmerge", "stage", "merge", "--spec", "/etc/branchmerge/spec.yaml",
                               "--result", "/tmp/result.json"]
    env = env_of(main)
    assert env["BRANCHMERGE_TERMINATION_LOG"] == "/dev/termination-log" and env["BRANCHMERGE_PVC_ROOT"] == "/mnt/pvc"
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1"
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert mounts["/mnt/pvc/models"]["readOnly"] is False  # output claim is writable
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    assert "initContainers" not in pod  # no hf:// input, single pod
    assert main["image"] == "trainer:1"


def test_configmap_holds_resolved_spec():
    run = run_of("Merge", MERGE_SPEC)
    cm = build_configmap(run)
    spec = yaml.safe_load(cm["data"]["spec.yaml"])
    assert spec["kind"] == "Merge" and spec["spec"]["models"][0]["uri"] == "pvc://models/a"
    assert cm["immutable"] is True and cm["metadata"]["name"] == run.configmap_name


def test_multi_node_sft_indexed_job_torchrun_and_headless_service():
    run = run_of("BranchSFT", SFT_SPEC)
    children = build_children(run, 1, OPTS)
    assert [c["kind"] for c in children] == ["ConfigMap", "Service", "Job"]
    svc, job = children[1], children[2]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"branchmerge.dev/job": job["metadata"]["name"]}
    assert job["spec"]["template"]["metadata"]["labels"]["branchmerge.dev/job"] == job["metadata"]["name"]
    main = pod["containers"][0]
    assert main["command"][:2] == ["torchrun", "--no-python"] and main["command"][2:5] == ["branchmerge", "stage", "sft"]
    env = env_of(main)
    master = f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert env["PET_MASTER_ADDR"] == master and env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "4"
    assert "job-completion-index" in env["PET_NODE_RANK"]["fieldRef"]["fieldPath"]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "4"
    inits = {c["name"]: c for c in pod["initContainers"]}
    assert master in inits["wait-for-peers"]["command"]
    stage = inits["stage-input-0"]  # hf://org/base@main is staged with the token from the secret
    assert stage["command"][3:5] == ["org/base", "main"]
    assert stage["env"][0] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-secret", "key": "token"}}}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"]["sizeLimit"] == "16Gi" and "staging" in vols
    for c in pod["initContainers"] + pod["containers"]:
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_hf_secret_annotation_overrides_option():
    run = run_of("BranchSFT", SFT_SPEC, annotations={"branchmerge.dev/hf-token-secret": "mine/hf"})
    pod = build_job(run, 1, OPTS)["spec"]["template"]["spec"]
    ref = pod["initContainers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "mine", "key": "hf"}


def test_data_parallel_teachergen_ranks_from_completion_index():
    run = run_of("TeacherGen", TG_SPEC)
    job = build_job(run, 3, OPTS)
    assert job["spec"]["completionMode"] == "Indexed" and job["metadata"]["name"].endswith("-3")
    main = job["spec"]["template"]["spec"]["containers"][0]
    env = env_of(main)
    assert main["command"][0] == "branchmerge" and env["WORLD_SIZE"] == "2"
    assert "fieldRef" in env["RANK"]
    assert build_service(run, 3)["metadata"]["name"] == job["metadata"]["name"]


def test_scheduling_fields_env_secrets_queue_policy():
    spec = {**EVAL_SPEC, "resources": {
        "gpusPerNode": 1, "cpu": "4", "memory": "16Gi", "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "research", "image": "custom:2", "queueName": "team-a",
        "env": [{"name": "PLAIN", "value": "1"}, {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        "runPolicy": {"activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 60}}
    run = run_of("Eval", spec)
    job = build_job(run, 1, OPTS)
    assert job["metadata"]["labels"][KUEUE_QUEUE] == "team-a" and job["spec"]["suspend"] is True  # Kueue admits
    assert job["spec"]["activeDeadlineSeconds"] == 600 and job["spec"]["ttlSecondsAfterFinished"] == 60
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["priorityClassName"] == "research"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    main = pod["containers"][0]
    assert main["image"] == "custom:2"
    assert main["resources"]["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    env = env_of(main)
    assert env["PLAIN"] == "1" and env["KEY"] == {"secretKeyRef": {"name": "s", "key": "k"}}
    assert env["OMP_NUM_THREADS"] == "4"  # the CPU amount, not the node's cores


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


def test_stage_pods_get_no_api_token_and_report_progress_with_a_bound_one():
    plain = build_job(run_of("Merge", MERGE_SPEC), 1, OPTS)["spec"]["template"]["spec"]
    assert plain["automountServiceAccountToken"] is False and "serviceAccountName" not in plain
    assert not [v for v in plain["volumes"] if "projected" in v]
    assert "BRANCHMERGE_PROGRESS_URL" not in env_of(plain["containers"][0])

    opts = OperatorOptions(progress_url="http://branchmerge-operator.bm.svc:8082/progress")
    pod = build_job(run_of("Merge", MERGE_SPEC, opts), 1, opts)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    [token] = [v for v in pod["volumes"] if v["name"] == "progress-token"]
    assert token["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "branchmerge.dev/progress", "expirationSeconds": 3600, "path": "token"}}]
    main = pod["containers"][0]
    assert {"name": "progress-token", "mountPath": "/var/run/secrets/branchmerge", "readOnly": True} in main["volumeMounts"]
    assert env_of(main)["BRANCHMERGE_PROGRESS_URL"] == "http://branchmerge-operator.bm.svc:8082/progress"
    # init containers (staging, peer wait) never see it
    assert all(m["name"] != "progress-token" for c in pod.get("initContainers", []) for m in c.get("volumeMounts", []))


def test_openai_endpoint_key_comes_from_its_secret():
    spec = {**EVAL_SPEC, "engine": {"name": "openai", "endpoint": {
        "baseUrl": "http://teacher:8000/v1", "model": "m", "apiKeySecretRef": {"name": "api", "key": "key"}}}}
    main = build_job(run_of("Eval", spec), 1, OPTS)["spec"]["template"]["spec"]["containers"][0]
    assert env_of(main)["BRANCHMERGE_API_KEY"] == {"secretKeyRef": {"name": "api", "key": "key"}}


def test_shm_defaults_from_gpu_count():
    assert shm_size({"gpusPerNode": 8}) == "64Gi" and shm_size({}) == "1Gi" and shm_size({"shmSize": "2Gi"}) == "2Gi"


@pytest.mark.parametrize("spec,needle", [
    ({**MERGE_SPEC, "output": {"uri": "s3://bucket/out"}}, "s3:// outputs"),
    ({**MERGE_SPEC, "models": [{"uri": "s3://b/m"}, {"uri": "pvc://m/b"}]}, "s3:// inputs"),
    ({k: v for k, v in MERGE_SPEC.items() if k != "output"}, "spec.output.uri"),
])
def test_unsupported_storage_is_a_permanent_invalid_spec(spec, needle):
    blocked = target(cr("Merge", "x", spec), {}, OPTS)
    assert blocked.phase == "Failed" and blocked.reason == "InvalidSpec" and needle in blocked.message


def test_default_output_root():
    spec = {k: v for k, v in MERGE_SPEC.items() if k != "output"}
    run = target(cr("Merge", "x", spec), {}, OperatorOptions(default_output_root="pvc://store/out/"))
    assert run.spec["output"]["uri"] == "pvc://store/out/ns/merge/x"


# ---- pod details on a real cluster: volume ownership, QoS, /dev/shm ----------------------------------------

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


def pod_of(kind, spec, opts=OPTS):
    return build_job(run_of(kind, spec, opts), 1, opts)["spec"]["template"]["spec"]


def test_volume_ownership_is_changed_only_on_root_mismatch():
    """fsGroup alone makes the kubelet chown every file of every volume at each start (a model PVC: minutes)."""
    for kind, spec in (("Merge", MERGE_SPEC), ("BranchSFT", SFT_SPEC)):
        ctx = pod_of(kind, spec)["securityContext"]
        assert ctx["fsGroup"] == 1000 and ctx["fsGroupChangePolicy"] == "OnRootMismatch"


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
