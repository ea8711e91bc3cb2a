"""Child objects of one stage run: the ConfigMap holding the resolved spec, the batch/v1 Job, and for
multi-pod runs a headless Service. Pure functions over plain dicts (unit-tested without a cluster).

Pod shape: ``branchmerge stage <stage> --spec /etc/branchmerge/spec.yaml --result /tmp/result.json``;
the stage writes a compact result to the termination message (``BRANCHMERGE_TERMINATION_LOG``), which
the operator reads from the pods when the Job ends. Multi-node BranchSFT runs under torchrun (configured
through its PET_* environment variables) and data-parallel TeacherGen and Eval get RANK/WORLD_SIZE from the
completion index; all use an Indexed Job whose pod 0 is reachable as ``<job>-0.<service>``.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from urllib.parse import urlparse

from ..api.common import API_VERSION, GROUP
from ..api.resources import KIND_INFO
from ..api import progress_channel as progress
from ..trainer.uris import InvalidHfUri, hf_inputs, parse_hf_uri, staged_name
from .naming import (ANNOTATION_HF_SECRET, KUEUE_QUEUE, LABEL_ATTEMPT, LABEL_JOB, LABEL_RUN, child_name,
                     owner_labels)
from .options import OperatorOptions

SPEC_DIR = "/etc/branchmerge"
SPEC_FILE = f"{SPEC_DIR}/spec.yaml"
RESULT_FILE = "/tmp/result.json"
PVC_ROOT = "/mnt/pvc"
STAGING_ROOT = "/mnt/staging"
MAIN_CONTAINER = "stage"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
RENDEZVOUS_PORT = 29500  # torchrun / torch.distributed on pod 0
GPU_RESOURCE = "nvidia.com/gpu"

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


class UnsupportedSpec(ValueError):
    """The spec cannot run on Kubernetes as written (permanent: InvalidSpec)."""


@dataclass(frozen=True)
class Run:
    """One run of a CR: its identity, the resolved manifest and the operator settings."""

    kind: str
    name: str
    namespace: str
    uid: str
    run_hash: str
    resolved: dict
    labels: dict = field(default_factory=dict)
    hf_secret: str | None = None  # "name" or "name/key"

    @property
    def spec(self) -> dict:
        return self.resolved["spec"]

    @property
    def resources(self) -> dict:
        return self.spec.get("resources", {})

    @property
    def run_policy(self) -> dict:
        return self.spec.get("runPolicy", {})

    @property
    def configmap_name(self) -> str:
        return child_name(self.name, self.run_hash)

    def job_name(self, attempt: int) -> str:
        return child_name(self.name, self.run_hash, attempt)

    @property
    def pods(self) -> int:
        """Pods per attempt: multi-node SFT and data-parallel generation spread over resources.nodes."""
        if self.kind in ("BranchSFT", "TeacherGen", "Eval"):
            return int(self.resources.get("nodes", 1))
        return 1

    def owner_reference(self) -> dict:
        return {"apiVersion": API_VERSION, "kind": self.kind, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}

    def child_labels(self, attempt: int | None = None) -> dict[str, str]:
        labels = {k: v for k, v in self.labels.items() if not k.startswith("kueue.x-k8s.io/")}
        labels.update(owner_labels(self.kind, self.name))
        labels[LABEL_RUN] = self.run_hash
        if attempt is not None:
            labels[LABEL_ATTEMPT] = str(attempt)
        return labels


def hf_secret_for(cr: dict, opts: OperatorOptions) -> str | None:
    """The CR's annotation wins over the operator-wide default."""
    annotations = cr.get("metadata", {}).get("annotations") or {}
    return annotations.get(ANNOTATION_HF_SECRET) or opts.hf_token_secret


# ---- URIs -> volumes ----------------------------------------------------------------------------------

def _uris(node, path: str = "") -> list[tuple[str, str]]:
    """Every ``uri`` in a resolved spec with its path."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else key
            if key == "uri" and isinstance(value, str):
                found.append((path, value))
            else:
                found += _uris(value, sub)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _uris(item, f"{path}[{i}]")
    return found


# Inputs are mounted read-only; these locations are written by the stage besides spec.output.
WRITTEN_URIS = ("spec.checkpointing",)


def storage_plan(run: Run) -> tuple[dict[str, bool], list[tuple[str, tuple[str, ...]]]]:
    """(claims -> mounted writable, hf:// inputs to stage: URI and allowPatterns); UnsupportedSpec for what
    pods cannot do."""
    output_uri = run.spec.get("output", {}).get("uri")
    if not output_uri:
        raise UnsupportedSpec("spec.output.uri: required (the operator has no --default-output-root)")
    claims: dict[str, bool] = {}
    out = urlparse(output_uri)
    if out.scheme == "pvc":
        claims[out.netloc] = True
    elif out.scheme != "file":
        raise UnsupportedSpec(f"spec.output.uri: {out.scheme}:// outputs are not supported on Kubernetes; "
                              "use pvc://claim/path")
    for path, uri in _uris(run.spec, "spec"):
        if path == "spec.output":
            continue
        scheme = urlparse(uri).scheme
        if scheme == "pvc" and path in WRITTEN_URIS:
            claims[urlparse(uri).netloc] = True
        elif scheme == "pvc":
            claims.setdefault(urlparse(uri).netloc, False)
        elif scheme == "hf":
            try:
                parse_hf_uri(uri)  # what the API's pattern cannot say (hf://datasets/org, a '..' in the path)
            except InvalidHfUri as err:
                raise UnsupportedSpec(f"{path}.uri: {err}") from None
        elif scheme == "s3":
            raise UnsupportedSpec(f"{path}.uri: s3:// inputs are not staged by the operator; copy them to a "
                                  "PVC and use pvc://")
    return claims, hf_inputs(run.spec)  # one copy per URI and file selection


def staging_command(uri: str, allow_patterns: Sequence[str] = ()) -> list[str]:
    """The stage-input init container's command for one hf:// input (trainer/staging.py); a model repository
    without a subpath or patterns keeps the first form (REPO REVISION DEST), which older trainer images run."""
    hf = parse_hf_uri(uri)
    command = ["python", "-m", "branchmerge.trainer.staging", hf.repo_id, hf.revision or "",
               f"{STAGING_ROOT}/{staged_name(uri, allow_patterns)}"]
    if hf.repo_type != "model":
        command += ["--repo-type", hf.repo_type]
    if hf.subpath:
        command += ["--subpath", hf.subpath]
    for pattern in allow_patterns:
        command += ["--allow-pattern", pattern]
    return command


def _volume_name(prefix: str, text: str) -> str:
    name = f"{prefix}-{text}".lower().replace(".", "-")
    if len(name) > 63:
        name = f"{name[:54]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return name


_SUFFIX = {"": 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
           "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(text: str) -> Fraction:
    """A Kubernetes quantity in the API's syntax (``api.common.Quantity``: 8, 500m, 1.5Gi) as a number."""
    found = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", str(text).strip())
    if not found or found.group(2) not in _SUFFIX:
        raise ValueError(f"not a quantity: {text!r}")
    return Fraction(found.group(1)) * _SUFFIX[found.group(2)]


def _mebibytes(amount: Fraction) -> str:
    """A memory amount, rounded down to whole Mi (written in Gi when exact)."""
    mib = max(1, int(amount // 2**20))
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def shm_size(resources: dict) -> str:
    """/dev/shm for NCCL and dataloaders: explicit, else 8Gi per GPU (1Gi on CPU), at most half the memory
    limit. It is a memory-backed emptyDir: what is written there is charged to the pod's memory (and so
    counts against resources.memory, which is the limit); a default as large as the limit would leave the
    stage itself nothing before the OOM killer comes."""
    if resources.get("shmSize"):
        return resources["shmSize"]
    gpus = int(resources.get("gpusPerNode", 0))
    size = Fraction(max(1, 8 * gpus) * 2**30)
    if resources.get("memory"):
        size = min(size, quantity(resources["memory"]) / 2)
    return _mebibytes(size)


# ---- children -----------------------------------------------------------------------------------------

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


def service_name(run: Run, attempt: int) -> str:
    return run.job_name(attempt)


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


def _env(run: Run, attempt: int, opts: OperatorOptions) -> list[dict]:
    job = run.job_name(attempt)
    pods = run.pods
    gpus = int(run.resources.get("gpusPerNode", 0))
    multi = pods > 1
    master = f"{job}-0.{service_name(run, attempt)}" if multi else "127.0.0.1"
    index_ref = {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}}
    env: list[dict] = [
        {"name": "BRANCHMERGE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "BRANCHMERGE_STAGING_ROOT", "value": STAGING_ROOT},
        {"name": "BRANCHMERGE_TERMINATION_LOG", "value": "/dev/termination-log"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
    ]
    if uses_torchrun(run):
        env += [
            {"name": "PET_NNODES", "value": str(pods)},
            {"name": "PET_NPROC_PER_NODE", "value": str(max(gpus, 1))},
            {"name": "PET_NODE_RANK", **index_ref} if multi else {"name": "PET_NODE_RANK", "value": "0"},
            {"name": "PET_MASTER_ADDR", "value": master},
            {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        ]
    else:  # one process per pod: the pod index is the rank (data-parallel shards)
        env += [
            {"name": "RANK", **index_ref} if multi else {"name": "RANK", "value": "0"},
            {"name": "WORLD_SIZE", "value": str(pods)},
            {"name": "LOCAL_RANK", "value": "0"},
        ]
    if opts.progress_url:
        env += [{"name": progress.URL_ENV, "value": opts.progress_url},
                {"name": progress.INTERVAL_ENV, "value": str(opts.progress_interval_seconds)}]
    for engine_path in (("teacher", "engine"), ("engine",)):
        node = run.spec
        for key in engine_path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        ref = (node.get("endpoint") or {}).get("apiKeySecretRef")
        if ref:
            env.append({"name": "BRANCHMERGE_API_KEY",  # trainer/engine/openai_engine.py API_KEY_ENV
                        "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}}})
    threads = threads_per_process(run)
    if threads and not any(item["name"] == "OMP_NUM_THREADS" for item in run.resources.get("env", [])):
        env.append({"name": "OMP_NUM_THREADS", "value": str(threads)})
    for item in run.resources.get("env", []):
        if "valueFrom" in item:  # secrets only by reference
            ref = item["valueFrom"]["secretKeyRef"]
            env.append({"name": item["name"], "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}}})
        else:
            env.append({"name": item["name"], "value": item.get("value", "")})
    return env


def threads_per_process(run: Run) -> int | None:
    """CPU threads per process from the pod's CPU amount (None when unset). torch sizes its pools by the
    node's cores, not the container's CPU limit, and OpenMP teams larger than the CPU share spin-wait on
    descheduled threads: on 2 CPUs a merge ran 7x slower with one thread too many (bench/merge.py)."""
    cpu = run.resources.get("cpu")
    if not cpu:
        return None
    text = str(cpu)
    cores = int(text[:-1]) / 1000 if text.endswith("m") else float(text)
    processes = max(int(run.resources.get("gpusPerNode", 0)), 1) if uses_torchrun(run) else 1
    return max(1, int(cores // processes))


FILE_SHARING_KINDS = ("TeacherGen", "Eval")  # their workers share files, not a rendezvous: no peer wait


def uses_torchrun(run: Run) -> bool:
    gpus = int(run.resources.get("gpusPerNode", 0))
    return run.kind == "BranchSFT" and (run.pods > 1 or gpus > 1)


def stage_command(run: Run) -> list[str]:
    stage = KIND_INFO[run.kind].stage
    command = ["branchmerge", "stage", stage, "--spec", SPEC_FILE, "--result", RESULT_FILE]
    if uses_torchrun(run):  # torchrun reads nnodes/node rank/master from PET_* variables
        return ["torchrun", "--no-python"] + command
    return command


def _container_security(ipc_lock: bool = False) -> dict:
    """Pod Security Standard "restricted": non-root, no privilege escalation, every capability dropped.
    ``ipc_lock`` (spec.resources.ipcLock, the stage container only) adds IPC_LOCK back, which RDMA memory
    registration may need: the documented exception, which needs a namespace at the "privileged" level
    (neither "restricted" nor "baseline" allows adding IPC_LOCK; docs/operations.md)."""
    capabilities: dict = {"drop": ["ALL"]}
    if ipc_lock:
        capabilities["add"] = ["IPC_LOCK"]
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": capabilities, "seccompProfile": {"type": "RuntimeDefault"}}


# Pod annotation prefixes owned by someone else: the operator's own group, and the Job controller's (it
# writes batch.kubernetes.io/job-completion-index, which the pods read their rank from).
RESERVED_ANNOTATION_PREFIXES = (f"{GROUP}/", "batch.kubernetes.io/")


def check_pod_settings(resources: dict) -> None:
    """UnsupportedSpec (the CR fails with InvalidSpec) for pod settings the operator will not pass on, found
    here rather than as a Job the API server refuses: a podAnnotations key in a reserved namespace (refused
    rather than silently dropped or overwritten), and extraResources the API server would not accept."""
    for key in resources.get("podAnnotations") or {}:
        if key.startswith(RESERVED_ANNOTATION_PREFIXES):
            raise UnsupportedSpec(f"spec.resources.podAnnotations: {key!r} is reserved (keys under "
                                  f"{' and '.join(RESERVED_ANNOTATION_PREFIXES)} are set by the operator and "
                                  "the Job controller)")
    for name, amount in (resources.get("extraResources") or {}).items():
        where = f"spec.resources.extraResources[{name}]"
        if name == GPU_RESOURCE:  # it also sizes torchrun: two sources would disagree
            raise UnsupportedSpec(f"{where}: set {GPU_RESOURCE} with gpusPerNode")
        if "kubernetes.io/" in name:  # Kubernetes' own resource names are not extended resources
            raise UnsupportedSpec(f"{where}: not an extended resource name (kubernetes.io is reserved)")
        if quantity(amount).denominator != 1:  # devices are counted, never shared by fractions
            raise UnsupportedSpec(f"{where}: {amount!r} must be a whole number (extended resources are integers)")


def device_resources(resources: dict) -> dict[str, str]:
    """The extended resources of the stage container: nvidia.com/gpu from gpusPerNode, then extraResources."""
    devices = {}
    if int(resources.get("gpusPerNode", 0)) > 0:
        devices[GPU_RESOURCE] = str(resources["gpusPerNode"])
    devices.update(resources.get("extraResources") or {})
    return devices


def container_resources(resources: dict, opts: OperatorOptions, devices: bool = True) -> dict:
    """Requests and limits of a stage container. spec.resources.cpu/memory are request and limit; where
    absent, the operator's default requests apply (no limit), so no stage pod is BestEffort: a GPU pod
    without requests would be the first evicted under memory pressure and could be packed onto a node with
    no CPU left. The default memory request includes /dev/shm, which is charged to the pod's memory.
    GPUs and spec.resources.extraResources (RDMA devices...) are requested and limited alike: extended
    resources cannot be overcommitted, so Kubernetes requires both to be equal.
    ``devices=False``: the same amounts for init containers (which never hold a GPU or RDMA device), which
    keeps the pod Guaranteed when cpu and memory are both set and does not change what the pod requests
    (init containers run before the stage, so the pod requests the larger of the two, not the sum)."""
    limits: dict[str, str] = {}
    if resources.get("cpu"):
        limits["cpu"] = resources["cpu"]
    if resources.get("memory"):
        limits["memory"] = resources["memory"]
    requests = dict(limits)
    if "cpu" not in requests and opts.default_cpu_request:
        requests["cpu"] = opts.default_cpu_request
    if "memory" not in requests and opts.default_memory_request:
        requests["memory"] = _mebibytes(quantity(opts.default_memory_request) + quantity(shm_size(resources)))
    if devices:
        for name, amount in device_resources(resources).items():
            requests[name] = limits[name] = amount
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def build_pod_spec(run: Run, attempt: int, opts: OperatorOptions) -> dict:
    claims, staged = storage_plan(run)
    image = run.resources.get("image") or opts.image
    multi = run.pods > 1
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
    for claim, writable in sorted(claims.items()):
        vol = _volume_name("pvc", claim)
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable})
    init: list[dict] = []
    init_resources = container_resources(run.resources, opts, devices=False)

    def base_container() -> dict:
        return {"image": image, "imagePullPolicy": opts.image_pull_policy, "securityContext": _container_security()}

    if staged:
        if opts.staging_claim:
            volumes.append({"name": "staging", "persistentVolumeClaim": {"claimName": opts.staging_claim}})
        else:
            volumes.append({"name": "staging", "emptyDir": {}})
        staging_mount = {"name": "staging", "mountPath": STAGING_ROOT}
        mounts.append({**staging_mount, "readOnly": True})
        token_env = []
        if run.hf_secret:
            name, _, key = run.hf_secret.partition("/")
            token_env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": key or "token"}}}]
        for i, (uri, patterns) in enumerate(staged):
            init.append({
                **base_container(),
                "name": f"stage-input-{i}",
                # once per input even on a staging PVC shared by pods and CRs (a lock; atomic publish)
                "command": staging_command(uri, patterns),
                # the command writes one line of why it failed there (the log tail if it could not)
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "env": token_env + [{"name": "HOME", "value": "/tmp"},
                                    {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
                                    {"name": "BRANCHMERGE_TERMINATION_LOG", "value": "/dev/termination-log"}],
                "volumeMounts": [staging_mount, {"name": "tmp", "mountPath": "/tmp"}],
                **({"resources": init_resources} if init_resources else {}),
            })
    if multi and run.kind not in FILE_SHARING_KINDS:
        init.append({
            **base_container(),
            "name": "wait-for-peers",
            "command": ["python", "-c", DNS_WAIT, f"{run.job_name(attempt)}-0.{service_name(run, attempt)}", "600"],
            **({"resources": init_resources} if init_resources else {}),
        })
    container = {
        **base_container(),
        # only the stage itself registers RDMA memory: init containers keep every capability dropped
        "securityContext": _container_security(ipc_lock=bool(run.resources.get("ipcLock"))),
        "name": MAIN_CONTAINER,
        "command": stage_command(run),
        "env": _env(run, attempt, opts),
        "volumeMounts": mounts,
        "terminationMessagePath": "/dev/termination-log",
        # The stage writes a JSON result there; if it dies first, the log tail explains why.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = container_resources(run.resources, opts)
    if resources:
        container["resources"] = resources
    pod: dict = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # no stage talks to the API server (progress: see above)
        "securityContext": {"runAsNonRoot": True, "runAsUser": opts.run_as_user, "runAsGroup": opts.run_as_user,
                            "fsGroup": opts.run_as_user,
                            # Without it the kubelet chowns every file of every volume at each pod start:
                            # minutes on a PVC holding large models. Only a root of another group is fixed.
                            "fsGroupChangePolicy": "OnRootMismatch",
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if init:
        pod["initContainers"] = init
    if run.resources.get("imagePullSecrets"):  # pod-level: init containers pull the same image
        pod["imagePullSecrets"] = [{"name": name} for name in run.resources["imagePullSecrets"]]
    if multi:
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
