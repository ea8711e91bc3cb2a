"""Pod Security Standard "restricted" for every stage pod: non-root, no privilege escalation, every
capability dropped, the runtime's default seccomp profile, and no API token."""
from __future__ import annotations

from ..options import OperatorOptions


def container_security(ipc_lock: bool = False) -> dict:
    """A container's securityContext. ``ipc_lock`` (spec.resources.ipcLock, the stage container only) adds
    IPC_LOCK back, which RDMA memory registration may need: the documented exception, which needs a namespace
    at the "privileged" level (neither "restricted" nor "baseline" allows adding IPC_LOCK; docs/operations.md)."""
    capabilities: dict = {"drop": ["ALL"]}
    if ipc_lock:
        capabilities["add"] = ["IPC_LOCK"]
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": capabilities, "seccompProfile": {"type": "RuntimeDefault"}}


def pod_security(opts: OperatorOptions) -> dict:
    """The pod-level fields: who the processes run as, and what the pod does not get."""
    return {
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # no stage talks to the API server (progress: a bound token)
        "securityContext": {"runAsNonRoot": True, "runAsUser": opts.run_as_user, "runAsGroup": opts.run_as_user,
                            "fsGroup": opts.run_as_user,
                            # Without it the kubelet chowns every file of every volume at each pod start:
                            # minutes on a PVC holding large models. Only a root of another group is fixed.
                            "fsGroupChangePolicy": "OnRootMismatch",
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
