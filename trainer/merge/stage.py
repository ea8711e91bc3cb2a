"""Merge stage entry point: ``run(ctx)`` validates the inputs, streams the merge into an atomic temp
folder (shards + index + config + tokenizer) and returns the metrics for the CR status."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...api.merge import MergeSpec
from ..errors import InvalidInput
from ..publish import atomic_folder
from .assets import copy_assets
from .engine import MergeRecipe, merge_models
from .methods import METHODS
from .model_folder import ModelFolder
from .params import ParamResolver, check_parameters, parse_size
from .layout import build_layout
from .preflight import Input, Preflight, check_inputs, estimate, log as log_preflight

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Once the result is written nothing is left to clean up (no child processes, no distributed state, every
# output fsynced): the stage command may end the process without the interpreter's teardown, where torch
# unregisters its operator libraries one by one (~0.4 s, a tenth of merging a 1 GB model).
ENDS_WITHOUT_TEARDOWN = True


class _Folders:
    """Opens each distinct input folder once (a model may also be the base)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.by_path: dict[Path, ModelFolder] = {}

    def open(self, ref, label: str) -> ModelFolder:
        path = self.ctx.input_path(ref, label).resolve()
        if path not in self.by_path:
            self.by_path[path] = ModelFolder(path, f"{label} ({ref.uri})")
        return self.by_path[path]

    def close(self) -> None:
        for folder in self.by_path.values():
            folder.close()


def build_recipe(spec: MergeSpec, folders: _Folders) -> tuple[MergeRecipe, ModelFolder, Preflight]:
    """The engine's recipe, after the pre-flight: every input checked from its headers, config and tokenizer
    (exit 2 on a mismatch) and the run's memory and output size estimated, before any tensor is read."""
    method = METHODS[spec.method]
    check_parameters(spec, method)
    base = folders.open(spec.base, "spec.base") if spec.base is not None else None
    models = [folders.open(m, f"spec.models[{i}]") for i, m in enumerate(spec.models)]
    if method.ANCHOR == "base" and base is None:
        raise InvalidInput(f"spec.base: method {spec.method} needs a base model")
    anchor = None
    if method.ANCHOR in ("base", "optional"):  # "optional": the base when set (nuslerp, multislerp)
        anchor = base
    elif method.ANCHOR == "first":
        anchor = base if base is not None else models[0]
    anchor_indexes = [i for i, m in enumerate(models) if anchor is not None and m is anchor]
    if method.ANCHOR == "first" and base is None:
        anchor_indexes = [0]
    other_indexes = [i for i in range(len(models)) if i not in anchor_indexes]
    others = [models[i] for i in other_indexes]
    needed = {"arcee_fusion": 1, "slerp": 1}.get(spec.method)
    if needed is not None and len(others) != needed:
        raise InvalidInput(f"spec.models: {spec.method} merges the base with exactly one other model, "
                           f"got {len(others)} besides the base")
    if spec.method == "model_stock" and len(others) < 2:
        raise InvalidInput("spec.models: model_stock needs at least 2 models besides the base")
    if not others:
        raise InvalidInput("spec.models: nothing to merge (every model is the base)")
    reference = base if base is not None else models[0]
    inputs = ([anchor] if anchor is not None else []) + others
    tokenizer_dir, tokenizer_label = tokenizer_source(spec, folders.ctx, reference)
    named = [Input("base", base)] if base is not None else []
    named += [Input(f"models[{i}]", m) for i, m in enumerate(models)]
    report = check_inputs(named, reference, tokenizer_dir, tokenizer_label)
    out_dtype = DTYPES[spec.out_dtype] if spec.out_dtype else None
    layout = build_layout(reference, inputs, out_dtype)
    recipe = MergeRecipe(method=method, anchor=anchor, others=others, other_indexes=other_indexes,
                   anchor_indexes=anchor_indexes, layout=layout, resolver=ParamResolver(spec, other_indexes),
                   compute_dtype=DTYPES[spec.dtype], seed=spec.seed, shard_bytes=parse_size(spec.out_shard_size))
    estimate(report, layout, inputs, recipe.compute_dtype, recipe.shard_bytes, reference.path, tokenizer_dir)
    return recipe, reference, report


def tokenizer_source(spec: MergeSpec, ctx, reference: ModelFolder) -> tuple[Path, str]:
    """The folder whose tokenizer files the output gets (and how messages name it)."""
    if spec.tokenizer_source is not None:
        path = ctx.input_path(spec.tokenizer_source, "spec.tokenizerSource")
        return path, f"spec.tokenizerSource ({spec.tokenizer_source.uri})"
    return reference.path, reference.label


PROVENANCE = "branchmerge_merge.json"


def write_provenance(folder: Path, ctx, metrics: dict) -> None:
    """How this folder was made (method, input URIs, parameters, metrics), like mergekit's model card."""
    spec = ctx.spec.wire()
    spec.pop("resources", None)
    spec.pop("runPolicy", None)
    record = {"kind": "Merge", "name": ctx.resource.name, "spec": spec, "metrics": metrics}
    (folder / PROVENANCE).write_text(json.dumps(record, indent=2, default=str) + "\n")


def run(ctx) -> dict:
    spec: MergeSpec = ctx.spec
    folders = _Folders(ctx)
    try:
        recipe, reference, report = build_recipe(spec, folders)
        log_preflight(report)
        out = Path(ctx.output_dir).resolve()
        for path, folder in folders.by_path.items():
            if out == path or out in path.parents or path in out.parents:  # replacing it would destroy an input
                raise InvalidInput(f"spec.output.uri: {ctx.output_uri} overlaps the input {folder.label}")
        tokenizer_dir, _ = tokenizer_source(spec, ctx, reference)
        ctx.progress.update(0.0, f"{spec.method}: merging {len(recipe.layout.tensors)} tensors", force=True,
                            tensorsTotal=len(recipe.layout.tensors))
        digests: dict[str, str] = {}
        with atomic_folder(ctx.output_dir, known_digests=digests) as tmp:
            metrics, written = merge_models(recipe, tmp, ctx.progress)
            metrics["preflight"] = report.metrics()
            digests.update(written)  # hashed while merging: the manifest need not read the shards again
            copy_assets(tmp, reference.path, tokenizer_dir, vocab_size=recipe.layout.vocab_size,
                        out_dtype=DTYPES[spec.out_dtype] if spec.out_dtype else None)
            write_provenance(tmp, ctx, metrics)
        ctx.progress.update(1.0, f"{spec.method}: merged {metrics['tensorsMerged']} tensors", force=True,
                            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        return metrics
    finally:
        folders.close()
