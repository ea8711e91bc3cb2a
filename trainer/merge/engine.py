"""The streaming merge loop: tensors from every input, through the method, into the writer; as many tensors
at once as there are CPU threads to spend."""
from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

from ..progress import Progress
from .methods.base import MergeInputs, MergeOutput, RowBlocks
from .model_folder import ModelFolder
from .params import ParamResolver
from .layout import Layout
from .safetensors_io import ShardedWriter


@dataclass
class MergeRecipe:
    method: ModuleType
    anchor: ModelFolder | None  # the base (or slerp's first model); None for linear
    others: list[ModelFolder]  # the remaining models, spec order
    other_indexes: list[int]  # their index in spec.models
    anchor_indexes: list[int]  # spec.models entries that are the anchor
    layout: Layout
    resolver: ParamResolver
    compute_dtype: torch.dtype
    seed: int
    shard_bytes: int


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


@dataclass
class TensorDone:
    """What one tensor's merge reports back to the loop (counts for the metrics)."""

    entries: int = 0
    taken: dict[int, int] = field(default_factory=dict)  # spec.models index -> entries taken from it


# Each worker keeps up to RELEASE_LAG_BYTES of every input mapped: without OMP_NUM_THREADS (a pod without a
# CPU request) torch would count every core of the node, and 64 workers would map 12 GB of inputs.
MAX_WORKERS = 8


def merge_workers() -> int:
    """Tensors merged at once: torch's thread budget (OMP_NUM_THREADS, which the operator sets from the
    pod's CPU), spent on whole tensors rather than inside each operation, at most MAX_WORKERS. A block's
    operations are too short to split well across an OpenMP team, and single-threaded workers also run the
    numpy and Python parts of a method in parallel."""
    return max(1, min(MAX_WORKERS, torch.get_num_threads()))


def merge_models(recipe: MergeRecipe, out_dir: Path, progress: Progress) -> tuple[dict, dict[str, str]]:
    """Merge every planned tensor into ``out_dir``: (metrics, sha256 of each file written)."""
    started = time.time()
    inputs = ([recipe.anchor] if recipe.anchor is not None else []) + recipe.others
    writer = ShardedWriter(out_dir, recipe.layout.out_tensors, recipe.shard_bytes)
    by_name = {t.name: t for t in recipe.layout.tensors}
    taken = {i: 0 for i in recipe.other_indexes + recipe.anchor_indexes}
    reports_taken = False
    merged_entries = bytes_read = 0
    read: set[tuple[int, str]] = set()
    total = len(writer.order)
    workers = merge_workers()
    stop = threading.Event()  # set on failure or interrupt: workers give up at their next block

    def merge_one(out) -> TensorDone:
        planned = by_name[out.name]
        done = TensorDone()
        if planned.merge:
            writer.write_blocks(out.name, _merged_blocks(recipe, inputs, planned, out.dtype, done, stop))
        else:
            writer.write(out.name, _load(inputs[0], planned.sources[0], planned.rows, out.dtype))
        for folder, source in zip(inputs, planned.sources):
            folder.release(source)
        return done

    previous_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="merge") if workers > 1 else None
    try:
        if pool is not None:
            torch.set_num_threads(1)
            # in file order, so the writer can hash and flush tensors as they complete (sorting by size was
            # no faster, and held more memory); all at once: a finished tensor holds only its counts
            pending = {out.name: pool.submit(merge_one, out) for out in writer.order}
            results = (pending[out.name].result() for out in writer.order)
        else:
            results = (merge_one(out) for out in writer.order)
        for count, (out, result) in enumerate(zip(writer.order, results), start=1):
            writer.seal(out.name)
            merged_entries += result.entries
            if result.taken:
                reports_taken = True
                for index, n in result.taken.items():
                    taken[index] += n
            for folder, source in zip(inputs, by_name[out.name].sources):
                if (id(folder), source) not in read:
                    read.add((id(folder), source))
                    bytes_read += folder.info(source).nbytes
            progress.update(count / total, f"merged {out.name}", tensorsMerged=count, tensorsTotal=total,
                            bytesRead=bytes_read, bytesWritten=writer.bytes_written)
        files = writer.finish()
    except BaseException:
        stop.set()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # no worker may still write into the folder
        writer.abort()
        raise
    finally:
        torch.set_num_threads(previous_threads)
        if pool is not None:
            pool.shutdown(wait=True)
    metrics = {
        "method": recipe.method.NAME,
        "tensorsMerged": total,
        "parameters": merged_entries,
        "shards": len([f for f in files if f.endswith(".safetensors")]),
        "bytesRead": bytes_read,
        "bytesWritten": writer.bytes_written,
        "elapsedSeconds": round(time.time() - started, 3),
        "workers": workers,
        "vocabTrimmed": recipe.layout.vocab_size is not None,
    }
    if recipe.layout.vocab_size is not None:
        metrics["vocabSize"] = recipe.layout.vocab_size
        metrics["vocabRowsBefore"] = dict(recipe.layout.vocab_rows)
    if reports_taken and merged_entries:
        metrics["fractionTaken"] = {f"models[{i}]": round(taken[i] / merged_entries, 6) for i in sorted(taken)}
    return metrics, dict(writer.digests)


class Interrupted(Exception):
    """Another tensor's merge failed (or the run was interrupted): this one stops at its next block."""


def _merged_blocks(recipe: MergeRecipe, inputs: list[ModelFolder], planned, out_dtype: torch.dtype, done: TensorDone,
                   stop: threading.Event) -> Iterator[torch.Tensor]:
    """The method's output blocks for one tensor, cast for the writer; counts go into ``done``."""
    for result in _merge_results(recipe, inputs, planned):
        if stop.is_set():
            raise Interrupted(planned.out.name)
        tensor = result.tensor.to(out_dtype)
        done.entries += tensor.numel()
        if result.taken is not None:
            for index, count in zip(recipe.other_indexes, result.taken):
                done.taken[index] = done.taken.get(index, 0) + count
            for index in recipe.anchor_indexes:
                done.taken[index] = done.taken.get(index, 0) + (result.taken_base or 0)
        del result
        yield tensor


def _merge_results(recipe: MergeRecipe, inputs: list[ModelFolder], planned) -> Iterator[MergeOutput]:
    """The method's output for one tensor: whole when small (or 1-D), else block by block."""
    out = planned.out
    generator = torch.Generator().manual_seed(tensor_seed(recipe.seed, out.name))
    params = recipe.resolver.for_tensor(out.name)
    has_anchor = recipe.anchor is not None
    compute_bytes = out.numel * torch.empty((), dtype=recipe.compute_dtype).element_size()
    if out.numel == 0:  # nothing to merge (methods divide by the size or read quantiles)
        yield MergeOutput(torch.empty(out.shape, dtype=recipe.compute_dtype))
        return
    if compute_bytes <= BLOCKED_ABOVE_BYTES or len(out.shape) < 2:
        loaded = [_load(f, s, planned.rows, recipe.compute_dtype) for f, s in zip(inputs, planned.sources)]
        yield recipe.method.merge(MergeInputs(out.name, loaded[0] if has_anchor else None,
                                           loaded[1:] if has_anchor else loaded, params, generator))
        return
    views = [f.view(s) for f, s in zip(inputs, planned.sources)]
    row_bytes = max(v[0].numel() * v.element_size() for v in views)
    lag_rows = max(1, RELEASE_LAG_BYTES // max(1, row_bytes))
    released = [0]  # rows before this one have been handed back

    def rows(start: int, end: int) -> list[torch.Tensor]:
        """The inputs' rows as stored; pages far enough behind are handed back first."""
        if start - released[0] >= lag_rows:
            for f, s, v in zip(inputs, planned.sources, views):
                rb = v[0].numel() * v.element_size()
                f.release(s, released[0] * rb, (start - released[0]) * rb)
            released[0] = start
        elif start < released[0]:  # a new pass from the top
            released[0] = 0
        return [v[start:end] for v in views]

    def split(loaded: list[torch.Tensor]):
        return (loaded[0], loaded[1:]) if has_anchor else (None, loaded)

    def load(start: int, end: int):
        return split([r.to(recipe.compute_dtype) for r in rows(start, end)])

    per_row = max(1, out.numel // out.shape[0]) * torch.empty((), dtype=recipe.compute_dtype).element_size()
    src = RowBlocks(out.name, out.shape, max(1, BLOCK_BYTES // per_row), load, params, generator,
                    compute_dtype=recipe.compute_dtype, load_stored=lambda start, end: split(rows(start, end)),
                    out_dtype=out.dtype)
    yield from recipe.method.merge_blocks(src)
