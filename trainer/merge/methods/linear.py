"""linear (model soup / Branch-Train-Merge averaging): sum_k w_k * theta_k / sum_k w_k. No base."""
from __future__ import annotations

import torch

from .base import MergeInputs, MergeOutput, elementwise_blocks

NAME = "linear"
ANCHOR = None
ACCEPTS = frozenset({"weight", "normalize"})


def merge(inputs: MergeInputs) -> MergeOutput:
    p = inputs.params
    out = torch.zeros_like(inputs.others[0])
    for w, theta in zip(p.weights, inputs.others):
        out.add_(theta, alpha=w)
    total = sum(p.weights)
    if p.normalize and abs(total) >= 1e-8:
        out.div_(total)
    return MergeOutput(out)


merge_blocks = elementwise_blocks(merge)
