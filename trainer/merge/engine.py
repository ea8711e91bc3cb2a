"""The streaming merge loop: one tensor at a time from every input, through the method, into the writer."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

from ..progress import Progress
from .methods.base import MergeInputs, MergeOutput, RowBlocks
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


# Methods see a tensor a block of rows at a time (merge_blocks). Blocks of ~1 MB per input keep the method's
# dozen elementwise passes in the CPU caches instead of streaming each pass through main memory (of 256 KB,
# 1 MB and 4 MB, 1 MB was fastest: bench/merge.py); they also bound memory (a 152k x 5120 embedding is 3 GB in
# float32, and a method holds several copies). Smaller tensors are merged whole.
BLOCKED_ABOVE_BYTES = 1 << 20
BLOCK_BYTES = 1 << 20
# Input pages of a blocked tensor are handed back to the kernel this many bytes behind the block being read:
# methods make several passes, and pages dropped after every block would be faulted in again by the next.
RELEASE_LAG_BYTES = 64 << 20


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
                def blocks():
                    nonlocal merged_entries, reports_taken
                    for result in _merge_results(job, inputs, planned):
                        tensor = result.tensor.to(out.dtype)
                        merged_entries += tensor.numel()
                        if result.taken is not None:
                            reports_taken = True
                            for index, count in zip(job.other_indexes, result.taken):
                                taken[index] += count
                            for index in job.anchor_indexes:
                                taken[index] += result.taken_base or 0
                        del result
                        yield tensor
                writer.write_blocks(out.name, blocks())
            else:
                writer.write(out.name, _load(inputs[0], planned.sources[0], planned.rows, out.dtype))
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


def _merge_results(job: MergeJob, inputs: list[ModelFolder], planned) -> Iterator[MergeOutput]:
    """The method's output for one tensor: whole when small (or 1-D), else block by block."""
    out = planned.out
    generator = torch.Generator().manual_seed(tensor_seed(job.seed, out.name))
    params = job.resolver.for_tensor(out.name)
    has_anchor = job.anchor is not None
    compute_bytes = out.numel * torch.empty((), dtype=job.compute_dtype).element_size()
    if out.numel == 0:  # nothing to merge (methods divide by the size or read quantiles)
        yield MergeOutput(torch.empty(out.shape, dtype=job.compute_dtype))
        return
    if compute_bytes <= BLOCKED_ABOVE_BYTES or len(out.shape) < 2:
        loaded = [_load(f, s, planned.rows, job.compute_dtype) for f, s in zip(inputs, planned.sources)]
        yield job.method.merge(MergeInputs(out.name, loaded[0] if has_anchor else None,
                                           loaded[1:] if has_anchor else loaded, params, generator))
        return
    views = [f.view(s) for f, s in zip(inputs, planned.sources)]
    row_bytes = max(v[0].numel() * v.element_size() for v in views)
    lag_rows = max(1, RELEASE_LAG_BYTES // max(1, row_bytes))
    released = [0]  # rows before this one have been handed back

    def load(start: int, end: int):
        if start - released[0] >= lag_rows:
            for f, s, v in zip(inputs, planned.sources, views):
                rb = v[0].numel() * v.element_size()
                f.release(s, released[0] * rb, (start - released[0]) * rb)
            released[0] = start
        elif start < released[0]:  # a new pass from the top
            released[0] = 0
        rows = [v[start:end].to(job.compute_dtype) for v in views]
        return (rows[0], rows[1:]) if has_anchor else (None, rows)

    per_row = max(1, out.numel // out.shape[0]) * torch.empty((), dtype=job.compute_dtype).element_size()
    src = RowBlocks(out.name, out.shape, max(1, BLOCK_BYTES // per_row), load, params, generator)
    yield from job.method.merge_blocks(src)
