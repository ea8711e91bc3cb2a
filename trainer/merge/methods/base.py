"""What every merge method receives for one tensor, and what it returns."""
from __future__ import annotations

from dataclasses import dataclass, field

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
