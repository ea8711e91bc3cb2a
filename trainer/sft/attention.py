"""Variable-length (block-diagonal causal) attention for packed rows on CPU, as flash-attention varlen does on GPU.

transformers' own packed path (sdpa + a block-diagonal mask built from position ids) is correct but computes
all L x L scores of a row and masks most of them: for rows of many short samples that is most of the work.
This attention function splits each row at the positions where position ids restart and runs causal SDPA per
sample, so the cost is the sum of n_i^2 instead of L^2. Registered with transformers' AttentionInterface
under ``ATTENTION``; with it no mask is built (the name is not a mask interface), which is also right for
right-padded rows: causal attention never lets a real token see the padding after it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION = "branchmerge_varlen"


def row_segments(positions: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each sample in one row: a new sample starts where the position does not go up by 1."""
    starts = [0] + [i for i in range(1, len(positions)) if positions[i] != positions[i - 1] + 1]
    return list(zip(starts, starts[1:] + [len(positions)]))


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     position_ids=None, **kwargs):
    """query (B, H, L, D), key/value (B, Hkv, L, D) -> (B, L, H, D), None."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling, is_causal=attention_mask is None and query.shape[2] > 1)
        return out.transpose(1, 2).contiguous(), None
    positions = position_ids.expand(query.shape[0], -1).tolist()
    rows = []
    for b, row in enumerate(positions):
        spans = row_segments(row)
        parts = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                                dropout_p=dropout, scale=scaling, is_causal=True)
                 for s, e in spans]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, varlen_attention)
    return ATTENTION
