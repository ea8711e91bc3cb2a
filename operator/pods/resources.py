"""What a stage pod asks of its node: CPU, memory and device requests and limits, /dev/shm, the thread
budget per process, and the checks on spec.resources that are better an InvalidSpec than a Job the API
server refuses."""
from __future__ import annotations

import re
from fractions import Fraction

from ...api.common import GROUP
from ..launch_profile import LaunchProfile
from ..options import OperatorOptions
from .run import UnsupportedSpec

GPU_RESOURCE = "nvidia.com/gpu"

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


def threads_per_process(resources: dict, profile: LaunchProfile) -> int | None:
    """CPU threads per process from the pod's CPU amount (None when unset). torch sizes its pools by the
    node's cores, not the container's CPU limit, and OpenMP teams larger than the CPU share spin-wait on
    descheduled threads: on 2 CPUs a merge ran 7x slower with one thread too many (bench/merge.py)."""
    cpu = resources.get("cpu")
    if not cpu:
        return None
    text = str(cpu)
    cores = int(text[:-1]) / 1000 if text.endswith("m") else float(text)
    return max(1, int(cores // profile.procs_per_node))


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


def _device_resources(resources: dict) -> dict[str, str]:
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
        for name, amount in _device_resources(resources).items():
            requests[name] = limits[name] = amount
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out
