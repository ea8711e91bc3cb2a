"""Stage pods for NCCL over InfiniBand/RoCE (spec.resources.extraResources, podAnnotations, ipcLock) and
private registries (imagePullSecrets): where each setting lands in the built Job, that pods without them
stay within the Pod Security Standard "restricted", and that ipcLock is the one documented exception."""
from __future__ import annotations

import copy

import pytest

from branchmerge.api import conditions as C
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import Blocked, target
from branchmerge.operator.pods.job import build_job

from .kube_objects import EVAL_SPEC, MERGE_SPEC, SFT_SPEC, TG_SPEC, cr

OPTS = OperatorOptions(image="trainer:1", hf_token_secret="hf-secret")
MULTUS = "k8s.v1.cni.cncf.io/networks"
RDMA = {"extraResources": {"rdma/ib": "1"}, "podAnnotations": {MULTUS: "ib-net", "team": "math"},
        "ipcLock": True, "imagePullSecrets": ["registry", "mirror"]}

# The Pod Security Standards (kubernetes.io/docs/concepts/security/pod-security-standards), the controls a
# stage pod could touch: capabilities baseline may add, and the volume types restricted allows.
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def pss_violations(pod: dict, level: str) -> list[str]:
    """What a pod spec breaks of the "baseline" or "restricted" level (empty: it is admitted)."""
    found = [f"spec.{k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    pod_sc = pod.get("securityContext") or {}
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc, name = c.get("securityContext") or {}, c["name"]
        caps = sc.get("capabilities") or {}
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        allowed = {"NET_BIND_SERVICE"} if level == "restricted" else BASELINE_CAPABILITIES
        if set(caps.get("add") or []) - allowed:
            found.append(f"{name}: capabilities.add {caps['add']}")
        if level != "restricted":
            continue
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"{name}: capabilities.drop must include ALL")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) or sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            found.append(f"{name}: runAsNonRoot")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile")
    if level == "restricted":
        found += [f"volume {v['name']}" for v in pod.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    return found


def job_of(kind: str, spec: dict, extra: dict | None = None) -> dict:
    spec = copy.deepcopy(spec)
    spec.setdefault("resources", {}).update(copy.deepcopy(extra or {}))
    run = target(cr(kind, "x", spec), {}, OPTS)
    assert not isinstance(run, Blocked), run
    return build_job(run, 1, OPTS)


def test_rdma_settings_land_on_the_stage_container_and_the_pod():
    job = job_of("BranchSFT", SFT_SPEC, RDMA)  # 2 nodes x 4 GPUs, an hf:// input: two init containers
    template = job["spec"]["template"]
    pod = template["spec"]
    (main,) = pod["containers"]
    # extended resources are never overcommitted: requested and limited alike, next to the GPUs
    for which in ("requests", "limits"):
        assert main["resources"][which]["rdma/ib"] == "1" and main["resources"][which]["nvidia.com/gpu"] == "4"
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsNonRoot"] is True
    # init containers (staging, waiting for peers) hold no device and no capability
    assert [c["name"] for c in pod["initContainers"]] == ["stage-input-0", "wait-for-peers"]
    for init in pod["initContainers"]:
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        amounts = {**init.get("resources", {}).get("requests", {}), **init.get("resources", {}).get("limits", {})}
        assert "rdma/ib" not in amounts and "nvidia.com/gpu" not in amounts
        assert "imagePullSecrets" not in init
    # pod level: the pull secrets (for init containers too) and the annotations (Multus reads the pod's)
    assert pod["imagePullSecrets"] == [{"name": "registry"}, {"name": "mirror"}]
    assert template["metadata"]["annotations"] == {MULTUS: "ib-net", "team": "math"}
    assert "annotations" not in job["metadata"]  # on the pods, not on the Job
    assert template["metadata"]["labels"]["branchmerge.dev/job"] == job["metadata"]["name"]
    # IPC_LOCK is the one thing "restricted" refuses, and "baseline" too: the namespace needs "privileged"
    assert pss_violations(pod, "restricted") == ["stage: capabilities.add ['IPC_LOCK']"]
    assert pss_violations(pod, "baseline") == ["stage: capabilities.add ['IPC_LOCK']"]


def test_each_setting_alone():
    pod = job_of("Merge", MERGE_SPEC, {"extraResources": {"rdma/ib": "2", "example.com/fpga": "1Ki"}})["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    assert main["resources"]["requests"]["example.com/fpga"] == main["resources"]["limits"]["example.com/fpga"] == "1Ki"
    assert "nvidia.com/gpu" not in main["resources"]["limits"]  # no GPUs asked for, none added
    assert pss_violations(pod, "restricted") == []  # extended resources alone keep the pod restricted
    job = job_of("Eval", EVAL_SPEC, {"imagePullSecrets": ["registry"]})
    assert job["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    assert "annotations" not in job["spec"]["template"]["metadata"]
    job = job_of("TeacherGen", TG_SPEC, {"podAnnotations": {MULTUS: "default/ib-net"}})
    assert job["spec"]["template"]["metadata"]["annotations"] == {MULTUS: "default/ib-net"}
    assert pss_violations(job["spec"]["template"]["spec"], "restricted") == []


@pytest.mark.parametrize("kind,spec", [("TeacherGen", TG_SPEC), ("BranchSFT", SFT_SPEC), ("Merge", MERGE_SPEC),
                                       ("Eval", EVAL_SPEC)])
@pytest.mark.parametrize("extra", [None, {"extraResources": {}, "podAnnotations": {}, "ipcLock": False,
                                          "imagePullSecrets": []}], ids=["absent", "defaults"])
def test_without_them_pods_stay_restricted(kind, spec, extra):
    job = job_of(kind, spec, extra)
    template = job["spec"]["template"]
    pod = template["spec"]
    assert pss_violations(pod, "restricted") == []
    assert set(template["metadata"]) == {"labels"} and "imagePullSecrets" not in pod
    for c in pod.get("initContainers", []) + pod["containers"]:
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        for amounts in c.get("resources", {}).values():
            assert set(amounts) <= {"cpu", "memory", "nvidia.com/gpu"}


@pytest.mark.parametrize("extra,message", [
    ({"podAnnotations": {"batch.kubernetes.io/job-completion-index": "0"}}, "is reserved"),
    ({"podAnnotations": {"branchmerge.dev/run": "x"}}, "is reserved"),
    ({"extraResources": {"nvidia.com/gpu": "8"}}, "set nvidia.com/gpu with gpusPerNode"),
    ({"extraResources": {"rdma/ib": "500m"}}, "must be a whole number"),
    ({"extraResources": {"rdma/ib": "1.5"}}, "must be a whole number"),
    ({"extraResources": {"kubernetes.io/ib": "1"}}, "not an extended resource name"),
])
def test_settings_the_operator_will_not_pass_on_fail_the_cr(extra, message):
    spec = copy.deepcopy(MERGE_SPEC)
    spec["resources"] = extra
    blocked = target(cr("Merge", "x", spec), {}, OPTS)
    assert isinstance(blocked, Blocked), blocked
    assert (blocked.phase, blocked.reason) == ("Failed", C.INVALID_SPEC)
    assert message in blocked.message and blocked.message.startswith("spec.resources.")
