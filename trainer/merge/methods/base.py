"""What every merge method receives for one tensor, and what it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass(frozen=True)
class TensorParams:
    """Parameters resolved for one tensor (overrides applied); lists follow ``MergeInputs.others``."""

    weights: tuple[float, ...] = ()
    densities: tuple[float | None, ...] = ()
    t: float | None = None
    lambda_: float = 1.0
    normalize: bool = True
    rescale: bool = False  # the stage fills each method's default (api.merge_methods)
    gammas: tuple[float, ...] = ()  # breadcrumbs*: share of the largest |delta| dropped, per model
    epsilons: tuple[float, ...] = ()  # della*: half-width of the keep probabilities, per model
    select_topk: float = 1.0  # sce
    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False
    normalize_weights: bool = True  # multislerp
    eps: float = 1e-8  # multislerp
    max_iter: int = 10  # karcher
    tol: float = 1e-5  # karcher


@dataclass
class MergeInputs:
    """One tensor of every input, already trimmed to common rows and cast to the compute dtype.

    ``base`` is the anchor (the base model; for slerp without a base, the first model; None for linear);
    ``others`` are the remaining models in spec order. These tensors may be read-only views of the input
    files: methods must not modify them in place.
    """

    name: str
    base: torch.Tensor | None
    others: list[torch.Tensor]
    params: TensorParams
    generator: torch.Generator


@dataclass
class MergeOutput:
    tensor: torch.Tensor
    taken: list[int] | None = None
    """Entries whose merged value came from each of ``others`` (methods that select entries)."""
    taken_base: int | None = None
    """Entries left at the base value (arcee_fusion)."""
    extra: dict = field(default_factory=dict)


@dataclass
class RowBlocks:
    """One tensor of every input, served a block of rows at a time: small blocks keep a method's elementwise
    passes inside the CPU cache, and memory stays bounded however large the tensor is.

    ``load(start, end)`` returns (anchor rows or None, [rows of each other model]) in the compute dtype;
    ``load_stored``, when given, the same rows as stored in the files (methods with fused kernels read
    bfloat16 directly instead of a float32 copy). Every method defines ``merge_blocks(RowBlocks)`` yielding a
    ``MergeOutput`` per block, in row order; the result must equal ``merge`` on the whole tensor.
    """

    name: str
    shape: tuple[int, ...]
    rows_per_block: int
    load: Callable[[int, int], tuple[torch.Tensor | None, list[torch.Tensor]]]
    params: TensorParams
    generator: torch.Generator
    original_shape: tuple[int, ...] | None = None  # a scalar served as one row
    compute_dtype: torch.dtype | None = None  # None: whatever ``load`` returns
    out_dtype: torch.dtype | None = None  # what the engine stores: kernels may write results in it directly
    load_stored: Callable[[int, int], tuple[torch.Tensor | None, list[torch.Tensor]]] | None = None

    def ranges(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.shape[0], self.rows_per_block):
            yield start, min(self.shape[0], start + self.rows_per_block)

    @property
    def numel(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count

    def stored(self, start: int, end: int) -> tuple[torch.Tensor | None, list[torch.Tensor]] | None:
        """The rows as stored in the files when the computation is in float32 (None otherwise): float32 and
        bfloat16 widen exactly, so reading them as stored computes the same numbers."""
        if self.compute_dtype != torch.float32:
            return None
        return (self.load_stored or self.load)(start, end)

    def inputs(self, start: int, end: int) -> MergeInputs:
        anchor, others = self.load(start, end)
        return MergeInputs(self.name, anchor, others, self.params, self.generator)

    def blocks(self) -> Iterator[MergeInputs]:
        """One pass: the inputs of every block, in row order."""
        for start, end in self.ranges():
            yield self.inputs(start, end)

    @classmethod
    def whole(cls, inputs: MergeInputs) -> "RowBlocks":
        """The tensors of ``inputs`` as a single block (a scalar as one row of one entry)."""
        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.reshape(1) if t.dim() == 0 else t
        first = inputs.base if inputs.base is not None else inputs.others[0]
        shape = tuple(first.shape) or (1,)
        return cls(inputs.name, shape, shape[0], lambda start, end: (rows(inputs.base), [rows(o) for o in inputs.others]),
                   inputs.params, inputs.generator, original_shape=tuple(first.shape), compute_dtype=first.dtype)

    def join(self, outputs: Iterator[MergeOutput]) -> MergeOutput:
        """One output for the whole tensor from the outputs of its blocks."""
        parts = list(outputs)
        tensor = parts[0].tensor if len(parts) == 1 else torch.cat([o.tensor for o in parts])
        taken = None if parts[0].taken is None else [sum(c) for c in zip(*(o.taken for o in parts))]
        taken_base = None if parts[0].taken_base is None else sum(o.taken_base for o in parts)
        shape = self.shape if self.original_shape is None else self.original_shape
        return MergeOutput(tensor.reshape(shape), taken, taken_base, parts[0].extra)


def row_dot_sums(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """For each (x, y) of one block, the float64 sum of x * y per row: (len(pairs), rows).

    Whole-tensor statistics (norms, dot products) are summed from these row sums at the end, so their
    value does not depend on how the tensor was cut into blocks."""
    out = []
    for x, y in pairs:
        rows = x.float().reshape(x.shape[0] if x.dim() else 1, -1)
        out.append((rows * y.float().reshape(rows.shape)).sum(dim=1, dtype=torch.float64))
    return torch.stack(out)


def whole_tensor(merge_blocks: Callable[[RowBlocks], Iterator[MergeOutput]]):
    """``merge`` for a method written as ``merge_blocks``: the whole tensor as one block."""

    def merge(inputs: MergeInputs) -> MergeOutput:
        src = RowBlocks.whole(inputs)
        return src.join(merge_blocks(src))

    return merge


def elementwise_blocks(merge: Callable[[MergeInputs], MergeOutput]):
    """``merge_blocks`` for methods whose every output entry depends only on the same entry of the inputs."""

    def merge_blocks(src: RowBlocks) -> Iterator[MergeOutput]:
        for inputs in src.blocks():
            yield merge(inputs)

    return merge_blocks
