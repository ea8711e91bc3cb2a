"""How the processes of a multi-pod or multi-rank run find each other: the rank environment (torchrun's
PET_* variables, or RANK/WORLD_SIZE from the Indexed Job's completion index for data-parallel workers), the
headless Service that gives pod 0 a DNS name (``<job>-0.<service>``), and the init container that waits
for it before a rendezvous."""
from __future__ import annotations

from ...api.labels import LABEL_JOB
from .run import Run

COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
RENDEZVOUS_PORT = 29500  # torchrun / torch.distributed on pod 0

# Init container: wait until pod 0 of the gang resolves through the headless Service (instead of a
# fixed sleep); publishNotReadyAddresses makes it resolvable as soon as the pod has an IP.
DNS_WAIT = """\
import socket, sys, time
host, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while True:
    try:
        socket.getaddrinfo(host, None)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit(f"{host} did not resolve in time")
        time.sleep(2)
"""


def service_name(run: Run, attempt: int) -> str:
    return run.job_name(attempt)


def _pod0(run: Run, attempt: int) -> str:
    return f"{run.job_name(attempt)}-0.{service_name(run, attempt)}"


def build_service(run: Run, attempt: int) -> dict:
    """Headless Service giving the gang's pods DNS names (<job>-<index>.<service>) for rendezvous."""
    job = run.job_name(attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(run, attempt), "namespace": run.namespace,
                     "labels": run.child_labels(attempt), "ownerReferences": [run.owner_reference()]},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: job},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


def rank_env(run: Run, attempt: int) -> list[dict]:
    """Where this pod's processes sit in the run: torchrun's settings, or the worker's rank and world size."""
    profile = run.profile
    multi = profile.nodes > 1
    master = _pod0(run, attempt) if multi else "127.0.0.1"
    index_ref = {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}}
    env: list[dict] = [{"name": "MASTER_ADDR", "value": master},
                       {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)}]
    if profile.torchrun:
        return env + [
            {"name": "PET_NNODES", "value": str(profile.nodes)},
            {"name": "PET_NPROC_PER_NODE", "value": str(profile.procs_per_node)},
            {"name": "PET_NODE_RANK", **index_ref} if multi else {"name": "PET_NODE_RANK", "value": "0"},
            {"name": "PET_MASTER_ADDR", "value": master},
            {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        ]
    # one process per pod: the pod index is the rank (data-parallel shards)
    return env + [
        {"name": "RANK", **index_ref} if multi else {"name": "RANK", "value": "0"},
        {"name": "WORLD_SIZE", "value": str(profile.nodes)},
        {"name": "LOCAL_RANK", "value": "0"},
    ]


def launcher(run: Run) -> list[str]:
    """What the stage command runs under: torchrun reads nnodes, node rank and master from PET_* variables."""
    return ["torchrun", "--no-python"] if run.profile.torchrun else []


def wait_for_peers(run: Run, attempt: int, base: dict, resources: dict) -> list[dict]:
    """The init container holding a rendezvous pod back until pod 0 resolves (none for workers, which share
    files rather than a rendezvous, or a single pod)."""
    if not run.profile.rendezvous:
        return []
    return [{**base, "name": "wait-for-peers", "command": ["python", "-c", DNS_WAIT, _pod0(run, attempt), "600"],
             **({"resources": resources} if resources else {})}]
