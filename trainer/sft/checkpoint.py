"""Resumable checkpoints: DeepSpeed engine state (weights, optimizer, scheduler) + our own client state.

Layout: ``<root>/step-<N>/`` (root: ``spec.checkpointing.uri``, else ``<output parent>/.<output name>.checkpoints``) with a ``complete.json`` written by rank 0
only after every rank has finished writing, so a kill mid-save leaves an incomplete folder that is ignored
(and removed by the next save). The fingerprint ties checkpoints to the spec that produced them: a rerun
with a different spec starts fresh instead of resuming someone else's run.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import torch

from ...api.outputs import write_json_atomic
from ...api.uris import local_path

COMPLETE = "complete.json"


def checkpoint_root(output_dir: Path, uri: str | None = None) -> Path:
    """``spec.checkpointing.uri`` when set, else a hidden folder beside the output."""
    return local_path(uri) if uri else output_dir.parent / f".{output_dir.name}.checkpoints"


# DeepSpeed copies its offline weight-recovery scripts beside the checkpoint folders on every save.
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def remove_all(root: Path) -> None:
    """Delete this run's checkpoints, then ``root`` if nothing else is in it (a user-given location may
    hold other things: only the step-* folders and DeepSpeed's scripts are ours)."""
    for folder in root.glob("step-*") if root.is_dir() else []:
        shutil.rmtree(folder, ignore_errors=True)
    for script in RECOVERY_SCRIPTS:
        (root / script).unlink(missing_ok=True)
    try:
        root.rmdir()
    except OSError:
        pass


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def fingerprint(spec, world_size: int) -> str:
    relevant = spec.model_dump(mode="json", by_alias=True, include={
        "base", "data", "chat_template", "training", "objective", "deepspeed", "trust_remote_code"})
    relevant["worldSize"] = world_size
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def complete_checkpoints(root: Path, fp: str) -> list[tuple[int, Path]]:
    found = []
    for folder in root.glob("step-*") if root.is_dir() else []:
        try:
            meta = json.loads((folder / COMPLETE).read_text())
        except (OSError, ValueError):
            continue
        if meta.get("fingerprint") == fp:
            found.append((int(meta["step"]), folder))
    return sorted(found)


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save(engine, root: Path, step: int, client_state: dict, fp: str, keep: int, rank: int, barrier) -> Path:
    tag = f"step-{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state=dict(client_state, rng=rng_state()),
                           save_latest=False)
    barrier()
    if rank == 0:
        write_json_atomic(root / tag / COMPLETE, {"step": step, "fingerprint": fp})
        complete = complete_checkpoints(root, fp)
        keep_tags = {p.name for _, p in complete[-keep:]}
        for folder in root.glob("step-*"):  # older complete ones beyond keep, and leftovers of killed saves
            if folder.name not in keep_tags:
                shutil.rmtree(folder, ignore_errors=True)
    barrier()
    return root / tag


def load(engine, folder: Path) -> dict:
    _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state and "rng" in client_state:
        set_rng_state(client_state["rng"])
    return client_state or {}
