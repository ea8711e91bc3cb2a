"""Which tensors the output has, where each input's copy lives, and their shapes and dtypes.

Built (and every input checked) before anything is written, so bad inputs fail fast with exit 2:
missing or extra tensors, shape mismatches. Two differences are tolerated because real checkpoints have
them: tied embeddings (a model without ``lm_head.weight`` uses its input embedding, and a reference
without it keeps the output tied) and vocabulary sizes (embedding rows are trimmed to the common rows).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import InvalidInput
from .model_folder import ModelFolder
from .safetensors_io import OutTensor

# Output-embedding name -> the input embeddings it is tied to in the common architectures.
TIED_ALIASES = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight"),
}
VOCAB_NAME = re.compile(r"(embed_tokens|wte|embed_in|embed_out|lm_head|word_embeddings)\.weight$")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LayoutTensor:
    name: str
    sources: tuple[str, ...]  # per input folder, the name to read (an alias for tied embeddings)
    rows: int | None  # trim dim 0 to this many rows (vocabulary mismatch), None: as is
    out: OutTensor
    merge: bool  # False: non-float tensor, copied from the reference


@dataclass
class Layout:
    tensors: list[LayoutTensor]
    vocab_rows: dict[str, int]  # input label -> rows before trimming (only when trimmed)
    vocab_size: int | None  # common rows when trimmed

    @property
    def out_tensors(self) -> list[OutTensor]:
        return [t.out for t in self.tensors]


def _source_name(folder: ModelFolder, name: str, reference: ModelFolder) -> str:
    if name in folder:
        return name
    for alias in TIED_ALIASES.get(name, ()):
        if alias in folder:
            return alias
    raise InvalidInput(f"{folder.label}: tensor {name} is missing (it is in {reference.label})")


def _is_vocab(name: str, folders: list[ModelFolder], shapes: list[tuple[int, ...]]) -> bool:
    if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes) or not shapes[0]:
        return False
    if VOCAB_NAME.search(name):
        return True
    return all(f.config.get("vocab_size") == s[0] for f, s in zip(folders, shapes))


def build_layout(reference: ModelFolder, folders: list[ModelFolder], out_dtype: torch.dtype | None) -> Layout:
    """``folders`` are the inputs in engine order (anchor first, when there is one); ``reference`` (one of
    them) fixes the tensor names and order and, by default, the output dtype."""
    names = reference.names()
    known = set(names)
    for folder in folders:
        for name in folder.names():
            if name in known or (name in TIED_ALIASES and any(a in known for a in TIED_ALIASES[name])):
                continue  # an untied lm_head merged into a tied output: the reference decides
            raise InvalidInput(f"{folder.label}: has tensor {name} that {reference.label} lacks "
                               f"(different architectures?)")
    planned, vocab_rows, vocab_size = [], {}, None
    for name in names:
        sources = tuple(_source_name(f, name, reference) for f in folders)
        infos = [f.info(s) for f, s in zip(folders, sources)]
        shapes = [i.shape for i in infos]
        rows = None
        if any(s != shapes[0] for s in shapes):
            if not _is_vocab(name, folders, shapes):
                detail = ", ".join(f"{list(s)} in {f.label}" for f, s in zip(folders, shapes))
                raise InvalidInput(f"tensor {name}: shapes differ ({detail})")
            rows = min(s[0] for s in shapes)
            vocab_size = rows if vocab_size is None else min(vocab_size, rows)
            for f, s in zip(folders, shapes):
                vocab_rows[f.label] = max(vocab_rows.get(f.label, 0), s[0])
        ref_info = reference.info(name)
        is_float = ref_info.dtype in FLOAT_DTYPES and all(i.dtype in FLOAT_DTYPES for i in infos)
        dtype = (out_dtype or ref_info.dtype) if is_float else ref_info.dtype
        shape = ((rows,) + tuple(shapes[0][1:])) if rows is not None else tuple(shapes[0])
        planned.append(LayoutTensor(name, sources, rows, OutTensor(name, dtype, shape), is_float))
    if vocab_size is not None:  # every vocabulary tensor gets the same row count
        planned = [LayoutTensor(p.name, p.sources, vocab_size,
                                 OutTensor(p.name, p.out.dtype, (vocab_size,) + p.out.shape[1:]), p.merge)
                   if p.rows is not None else p for p in planned]
    return Layout(planned, vocab_rows, vocab_size)
