"""Pod Security Standard "restricted" on every stage pod (operator/pods/hardening.py); the ipcLock exception
is in test_pod_network.py."""
from __future__ import annotations

import pytest

from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import target
from branchmerge.operator.pods.job import build_job

from .kube_objects import EVAL_SPEC, MERGE_SPEC, SFT_SPEC, TG_SPEC, cr

OPTS = OperatorOptions(image="trainer:1", hf_token_secret="hf-secret")
KINDS = [("Merge", MERGE_SPEC), ("BranchSFT", SFT_SPEC), ("TeacherGen", TG_SPEC), ("Eval", EVAL_SPEC)]


def pod_of(kind, spec):
    return build_job(target(cr(kind, "x", spec), {}, OPTS), 1, OPTS)["spec"]["template"]["spec"]


@pytest.mark.parametrize("kind, spec", KINDS)
def test_every_container_is_restricted(kind, spec):
    pod = pod_of(kind, spec)
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod.get("initContainers", []) + pod["containers"]:
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def test_volume_ownership_is_changed_only_on_root_mismatch():
    """fsGroup alone makes the kubelet chown every file of every volume at each start (a model PVC: minutes)."""
    for kind, spec in (("Merge", MERGE_SPEC), ("BranchSFT", SFT_SPEC)):
        ctx = pod_of(kind, spec)["securityContext"]
        assert ctx["fsGroup"] == 1000 and ctx["fsGroupChangePolicy"] == "OnRootMismatch"
