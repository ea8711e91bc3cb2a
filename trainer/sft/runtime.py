"""Process environment for DeepSpeed: rank/world from torchrun, the single-process fallback, precision, cleanup."""
from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_env() -> DistEnv:
    """Read rank/world from the torchrun/DeepSpeed environment; set the single-process values if absent.

    Without a launcher DeepSpeed falls back to MPI discovery (and fails without mpi4py), so a lone process
    gets RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 and a free local rendezvous port.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                   os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def choose_precision(requested: str) -> tuple[str, str]:
    """(precision actually used, note). On CPU without native bf16, bf16 is emulated and several times
    slower than fp32, and DeepSpeed has no fp16 on CPU: both fall back to fp32 (reported in metrics)."""
    import torch

    if requested == "fp32":
        return "fp32", ""
    if torch.cuda.is_available():
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            return "fp16", "bf16 unsupported by this GPU; using fp16"
        return requested, ""
    if requested == "bf16" and cpu_has_native_bf16():
        return "bf16", ""
    why = "no native bf16 on this CPU (avx512_bf16/amx_bf16)" if requested == "bf16" else "no fp16 training on CPU"
    return "fp32", f"{requested} requested; {why}: using fp32"


def shm_files(env: DistEnv) -> list[Path]:
    """DeepSpeed's CPU shared-memory all-reduce buffers of this rendezvous (66 MB each, left behind)."""
    uid = os.getuid() if hasattr(os, "getuid") else getpass.getuser()
    prefix = f"deepspeed_allreduce_buffer_{uid}_{env.master_addr}_{env.master_port}_"
    root = Path("/dev/shm")
    return sorted(root.glob(prefix + "*")) if root.is_dir() else []


def clean_shm(env: DistEnv) -> None:
    """Remove this rank's buffer (the mapping stays valid until exit; peers hold their own)."""
    for path in shm_files(env):
        if path.name.endswith(f"_{env.rank}"):
            path.unlink(missing_ok=True)
