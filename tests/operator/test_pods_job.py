"""The children of one attempt (operator/pods/job.py): ConfigMap, Job and Service for each kind and mode, as\nplain dicts (no cluster)."""
from __future__ import annotations

import yaml

from branchmerge.api.labels import KUEUE_QUEUE
from branchmerge.operator.naming import MAX_CHILD_NAME, child_name
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import target
from branchmerge.operator.pods.job import build_children, build_configmap, build_job

from .kube_objects import EVAL_SPEC, MERGE_SPEC, SFT_SPEC, cr

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


def test_default_output_root():
    spec = {k: v for k, v in MERGE_SPEC.items() if k != "output"}
    run = target(cr("Merge", "x", spec), {}, OperatorOptions(default_output_root="pvc://store/out/"))
    assert run.spec["output"]["uri"] == "pvc://store/out/ns/merge/x"
