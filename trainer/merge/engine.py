"""The streaming merge loop: one tensor at a time from every input, through the method, into the writer."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from ..progress import Progress
from .methods.base import MergeInputs
from .model_folder import ModelFolder
from .params import ParamResolver
from .plan import Plan
from .safetensors_io import ShardedWriter


@dataclass
class MergeJob:
    method: ModuleType
    anchor: ModelFolder | None  # the base (or slerp's first model); None for linear
    others: list[ModelFolder]  # the remaining models, spec order
    other_indexes: list[int]  # their index in spec.models
    anchor_indexes: list[int]  # spec.models entries that are the anchor
    plan: Plan
    resolver: ParamResolver
    compute_dtype: torch.dtype
    seed: int
    shard_bytes: int
    folders: list[ModelFolder] = field(default_factory=list)  # distinct folders, for byte accounting


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed that depends only on the spec seed and the name (not on order or sharding)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _load(folder: ModelFolder, source: str, rows: int | None, dtype: torch.dtype) -> torch.Tensor:
    tensor = folder.view(source)
    if rows is not None:
        tensor = tensor[:rows]
    return tensor.to(dtype)


def run_merge(job: MergeJob, out_dir: Path, progress: Progress) -> dict:
    started = time.time()
    inputs = ([job.anchor] if job.anchor is not None else []) + job.others
    writer = ShardedWriter(out_dir, job.plan.out_tensors, job.shard_bytes)
    taken = {i: 0 for i in job.other_indexes + job.anchor_indexes}
    reports_taken = False
    merged_entries = 0
    total = len(writer.order)
    by_name = {t.name: t for t in job.plan.tensors}
    try:
        for done, out in enumerate(writer.order, start=1):
            planned = by_name[out.name]
            if planned.merge:
                loaded = [_load(f, s, planned.rows, job.compute_dtype) for f, s in zip(inputs, planned.sources)]
                anchor = loaded[0] if job.anchor is not None else None
                others = loaded[1:] if job.anchor is not None else loaded
                generator = torch.Generator().manual_seed(tensor_seed(job.seed, out.name))
                result = job.method.merge(MergeInputs(out.name, anchor, others, job.resolver.for_tensor(out.name),
                                                      generator))
                tensor = result.tensor.to(out.dtype)
                merged_entries += tensor.numel()
                if result.taken is not None:
                    reports_taken = True
                    for index, count in zip(job.other_indexes, result.taken):
                        taken[index] += count
                    for index in job.anchor_indexes:
                        taken[index] += result.taken_base or 0
                del loaded, anchor, others, result
            else:
                tensor = _load(inputs[0], planned.sources[0], planned.rows, out.dtype)
            writer.write(out.name, tensor)
            del tensor
            for folder, source in zip(inputs, planned.sources):
                folder.release(source)
            progress.update(done / total, f"merged {out.name}", tensorsMerged=done, tensorsTotal=total,
                            bytesRead=sum(f.bytes_read for f in job.folders),
                            bytesWritten=writer.bytes_written)
        files = writer.finish()
    except BaseException:
        writer.abort()
        raise
    metrics = {
        "method": job.method.NAME,
        "tensorsMerged": total,
        "parameters": merged_entries,
        "shards": len([f for f in files if f.endswith(".safetensors")]),
        "bytesRead": sum(f.bytes_read for f in job.folders),
        "bytesWritten": writer.bytes_written,
        "elapsedSeconds": round(time.time() - started, 3),
        "vocabTrimmed": job.plan.vocab_size is not None,
    }
    if job.plan.vocab_size is not None:
        metrics["vocabSize"] = job.plan.vocab_size
        metrics["vocabRowsBefore"] = dict(job.plan.vocab_rows)
    if reports_taken and merged_entries:
        metrics["fractionTaken"] = {f"models[{i}]": round(taken[i] / merged_entries, 6) for i in sorted(taken)}
    return metrics
