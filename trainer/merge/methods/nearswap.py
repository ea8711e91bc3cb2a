"""nearswap: take the other model's value where it is near the base's (mergekit 0.1.5 semantics).

With B the base and O the one other model, per entry: w = clamp(t / max(|B - O|, 1e-6), 0, 1), result
w O + (1 - w) B. Where |B - O| <= t the entry is O's; farther apart it moves towards B, with O's share
t / |B - O| shrinking as the two differ more. t is the similarity threshold (required: no default).
Elementwise: one pass over the blocks.
"""
from __future__ import annotations

import torch

from ...errors import InvalidInput
from .base import MergeInputs, MergeOutput, elementwise_blocks

NAME = "nearswap"
ANCHOR = "base"
ACCEPTS = frozenset({"t"})
DIFF_FLOOR = 1e-6


def merge(inputs: MergeInputs) -> MergeOutput:
    base, (other,) = inputs.base, inputs.others
    if inputs.params.t is None:
        raise InvalidInput(f"spec.parameters.t: nearswap needs the similarity threshold t (tensor {inputs.name})")
    distance = torch.sub(base, other).abs_().clamp_(min=DIFF_FLOOR)
    weight = torch.div(float(inputs.params.t), distance).clamp_(0.0, 1.0)
    # w O + (1 - w) B as written (not lerp's rearrangement): the same rounding as mergekit
    return MergeOutput(other * weight + (1 - weight).mul_(base))


merge_blocks = elementwise_blocks(merge)
