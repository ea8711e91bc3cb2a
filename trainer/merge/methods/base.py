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
    rescale: bool = True


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
    """One (huge) tensor of every input, served a block of rows at a time so memory stays bounded.

    ``load(start, end)`` returns (anchor rows or None, [rows of each other model]) in the compute dtype.
    Methods that can work this way define ``merge_blocks(RowBlocks)`` yielding ``MergeOutput`` per block,
    in row order; the result must equal ``merge`` on the whole tensor.
    """

    name: str
    shape: tuple[int, ...]
    rows_per_block: int
    load: Callable[[int, int], tuple[torch.Tensor | None, list[torch.Tensor]]]
    params: TensorParams
    generator: torch.Generator

    def ranges(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.shape[0], self.rows_per_block):
            yield start, min(self.shape[0], start + self.rows_per_block)

    def inputs(self, start: int, end: int) -> MergeInputs:
        anchor, others = self.load(start, end)
        return MergeInputs(self.name, anchor, others, self.params, self.generator)


def elementwise_blocks(merge: Callable[[MergeInputs], MergeOutput]):
    """``merge_blocks`` for methods whose every output entry depends only on the same entry of the inputs."""

    def merge_blocks(src: RowBlocks) -> Iterator[MergeOutput]:
        for start, end in src.ranges():
            yield merge(src.inputs(start, end))

    return merge_blocks
