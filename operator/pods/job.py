"""The children of one attempt put together: the ConfigMap holding the resolved spec, the batch/v1 Job and,
for multi-pod runs, the headless Service (distributed.py).

Pod shape: ``branchmerge stage <stage> --spec /etc/branchmerge/spec.yaml --result /tmp/result.json``;
the stage writes a compact result to the termination message (``BRANCHMERGE_TERMINATION_LOG``), which
the operator reads from the pods when the Job ends. Every multi-pod run is an Indexed Job whose pod 0 is
reachable as ``<job>-0.<service>``.
"""
from __future__ import annotations

import json

from ...api import progress
from ...api.labels import KUEUE_QUEUE, LABEL_JOB
from ..options import OperatorOptions
from .distributed import build_service, launcher, rank_env, service_name, wait_for_peers
from .hardening import container_security, pod_security
from .resources import container_resources, shm_size, threads_per_process
from .run import Run
from .staging import PVC_ROOT, STAGING_ROOT, staging_init_containers, storage_volumes

SPEC_DIR = "/etc/branchmerge"
SPEC_FILE = f"{SPEC_DIR}/spec.yaml"
RESULT_FILE = "/tmp/result.json"
MAIN_CONTAINER = "stage"


def build_configmap(run: Run) -> dict:
    """The resolved manifest the pods run (immutable: a new spec is a new run with a new ConfigMap)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": run.configmap_name, "namespace": run.namespace, "labels": run.child_labels(),
                     "ownerReferences": [run.owner_reference()]},
        "immutable": True,
        # JSON is YAML (the stage loads it with yaml.safe_load) and ~50x cheaper to write than PyYAML.
        "data": {"spec.yaml": json.dumps(run.resolved, indent=1)},
    }


def _stage_env(run: Run, attempt: int, opts: OperatorOptions) -> list[dict]:
    env: list[dict] = [
        {"name": "BRANCHMERGE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "BRANCHMERGE_STAGING_ROOT", "value": STAGING_ROOT},
        {"name": "BRANCHMERGE_TERMINATION_LOG", "value": "/dev/termination-log"},
        {"name": "HOME", "value": "/tmp"},
        *rank_env(run, attempt),
    ]
    if opts.progress_url:
        env += [{"name": progress.URL_ENV, "value": opts.progress_url},
                {"name": progress.INTERVAL_ENV, "value": str(opts.progress_interval_seconds)}]
    threads = threads_per_process(run.resources, run.profile)
    if threads and not any(var.name == "OMP_NUM_THREADS" for var in run.profile.env):
        env.append({"name": "OMP_NUM_THREADS", "value": str(threads)})
    for var in run.profile.env:
        if var.secret:
            name, key = var.secret
            env.append({"name": var.name, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})
        else:
            env.append({"name": var.name, "value": var.value})
    return env


def stage_command(run: Run) -> list[str]:
    return launcher(run) + ["branchmerge", *run.profile.stage_args(SPEC_FILE, RESULT_FILE)]


def build_pod_spec(run: Run, attempt: int, opts: OperatorOptions) -> dict:
    image = run.resources.get("image") or opts.image
    storage, storage_mounts, staged = storage_volumes(run, opts)
    volumes = [
        {"name": "spec", "configMap": {"name": run.configmap_name}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(run.resources)}},
    ]
    mounts = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if opts.progress_url:  # the pod's only credential: good for the progress endpoint, bound to the pod
        volumes.append({"name": "progress-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": progress.AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}})
        mounts.append({"name": "progress-token", "mountPath": progress.TOKEN_DIR, "readOnly": True})
    volumes += storage
    mounts += storage_mounts
    init_resources = container_resources(run.resources, opts, devices=False)
    base = {"image": image, "imagePullPolicy": opts.image_pull_policy, "securityContext": container_security()}
    init = (staging_init_containers(run, staged, base, init_resources)
            + wait_for_peers(run, attempt, base, init_resources))
    container = {
        **base,
        # only the stage itself registers RDMA memory: init containers keep every capability dropped
        "securityContext": container_security(ipc_lock=bool(run.resources.get("ipcLock"))),
        "name": MAIN_CONTAINER,
        "command": stage_command(run),
        "env": _stage_env(run, attempt, opts),
        "volumeMounts": mounts,
        "terminationMessagePath": "/dev/termination-log",
        # The stage writes a JSON result there; if it dies first, the log tail explains why.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = container_resources(run.resources, opts)
    if resources:
        container["resources"] = resources
    pod: dict = {"restartPolicy": "Never", **pod_security(opts), "containers": [container], "volumes": volumes}
    if init:
        pod["initContainers"] = init
    if run.resources.get("imagePullSecrets"):  # pod-level: init containers pull the same image
        pod["imagePullSecrets"] = [{"name": name} for name in run.resources["imagePullSecrets"]]
    if run.pods > 1:
        pod["subdomain"] = service_name(run, attempt)
    if run.resources.get("nodeSelector"):
        pod["nodeSelector"] = dict(run.resources["nodeSelector"])
    if run.resources.get("tolerations"):
        pod["tolerations"] = [dict(t) for t in run.resources["tolerations"]]
    if run.resources.get("priorityClassName"):
        pod["priorityClassName"] = run.resources["priorityClassName"]
    return pod


def pod_metadata(run: Run, labels: dict[str, str]) -> dict:
    """The pod template's metadata: the operator's labels, and spec.resources.podAnnotations (e.g. a Multus
    k8s.v1.cni.cncf.io/networks attachment) as written; check_pod_settings keeps them off reserved keys."""
    meta: dict = {"labels": labels}
    if run.resources.get("podAnnotations"):
        meta["annotations"] = dict(run.resources["podAnnotations"])
    return meta


def build_job(run: Run, attempt: int, opts: OperatorOptions, suspend: bool = False) -> dict:
    """One attempt of the run. The Job itself never retries (backoffLimit 0): the operator classifies
    each failure (permanent vs retryable) and starts the next attempt with backoff."""
    name = run.job_name(attempt)
    labels = run.child_labels(attempt)
    queue = run.resources.get("queueName")
    if queue:
        labels[KUEUE_QUEUE] = queue
    pod_labels = run.child_labels(attempt) | {LABEL_JOB: name}
    spec: dict = {
        "backoffLimit": 0,
        "completions": run.pods,
        "parallelism": run.pods,
        # Kueue admits queued Jobs by unsuspending them, so they are created suspended.
        "suspend": bool(suspend or queue),
        "template": {"metadata": pod_metadata(run, pod_labels), "spec": build_pod_spec(run, attempt, opts)},
    }
    if run.pods > 1:
        spec["completionMode"] = "Indexed"
    if run.run_policy.get("activeDeadlineSeconds"):
        spec["activeDeadlineSeconds"] = int(run.run_policy["activeDeadlineSeconds"])
    if run.run_policy.get("ttlSecondsAfterFinished") is not None:
        spec["ttlSecondsAfterFinished"] = int(run.run_policy["ttlSecondsAfterFinished"])
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": run.namespace, "labels": labels,
                     "ownerReferences": [run.owner_reference()]},
        "spec": spec,
    }


def build_children(run: Run, attempt: int, opts: OperatorOptions, suspend: bool = False) -> list[dict]:
    """What one attempt needs, in creation order (the Job last: its pods mount the ConfigMap)."""
    children = [build_configmap(run)]
    if run.pods > 1:
        children.append(build_service(run, attempt))
    children.append(build_job(run, attempt, opts, suspend))
    return children
