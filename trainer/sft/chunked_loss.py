"""The training losses computed from hidden states, a chunk of positions at a time.

Why: the logits of one micro batch are positions x vocab. At 16384 x 152064 (Qwen) they are 5 GB in bf16 and
the fp32 upcast, its log-softmax and their gradients add 10 GB each: about 30 GB per rank for one loss. Here
the model returns its last hidden states (positions x hidden, small); the loss runs over ``chunks`` slices
of positions: logits = lm_head(slice) in the model's dtype, upcast to fp32, CE (and the KD divergence
against the teacher's logits of the same slice) summed. Each slice runs under ``torch.utils.checkpoint``:
its logits are freed after its forward and recomputed in the backward, so at most one slice's logits are
alive at any time -- peak O(chunk x vocab) instead of O(positions x vocab). The sums are the same as the
unchunked computation up to float summation order (tests/trainer/sft/test_sft_chunked_loss.py).

ZeRO-3: lm_head is called as a module (its ZeRO-3 hooks gather the partitioned weight, tied to
embed_tokens or not; inside the checkpointed function, so the recomputation gathers it again). The hidden
states come back as an output of the engine's forward (``output_hidden_states``), so DeepSpeed's backward
hooks on the forward's outputs still fire. The number of lm_head calls per micro batch is fixed for the
whole run (:func:`chunk_count` of the largest micro batch; smaller ones get smaller or empty slices):
ZeRO-3 records the order of module calls and requires it to be the same on every rank.

Models whose logits are not plain ``lm_head(hidden)`` (logit soft-capping, logit scaling) or that cannot
return hidden states fall back to the model's own logits, still upcast a chunk at a time.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .losses import divergence, token_cross_entropy
from .packing import IGNORE

# Positions per lm_head call. Peak loss memory is a few fp32 chunk x vocab tensors of 1024 x 152064 x 4 B =
# 0.6 GB: about 1.9 GB for CE, 6.7 GB for KD (student and teacher log-probs, probabilities, their gradients;
# bench/sft_loss.py), while a 1024-row matmul still keeps a GPU busy.
CHUNK_TOKENS = 1024
# config attributes of models whose logits are post-processed after lm_head, with their no-op values:
# soft-capping (Gemma 2/3), multiplied (Cohere), divided (Granite)
LOGIT_POSTPROCESSING = {"final_logit_softcapping": (None, 0, 0.0), "logit_scale": (None, 1, 1.0),
                        "logits_scaling": (None, 1, 1.0)}


@dataclass(frozen=True)
class KD:
    """A distillation term: divergence ``kind`` with its parameters (losses.divergence)."""
    kind: str
    temperature: float = 1.0
    beta: float = 0.5
    taid_t: float = 0.0
    sinkhorn_form: str = "batch"
    sinkhorn_iterations: int = 20
    sinkhorn_epsilon: float = 0.1
    sinkhorn_group: int = 64

    @property
    def group(self) -> int:
        """Positions that are coupled in the loss (the batch-wise Sinkhorn groups), 1 otherwise: chunk
        boundaries fall on multiples of it, so chunking never changes the loss."""
        return self.sinkhorn_group if self.kind == "sinkhorn" and self.sinkhorn_form == "batch" else 1


def chunk_count(tokens: int, chunk_tokens: int = CHUNK_TOKENS) -> int:
    """lm_head calls for a micro batch of up to ``tokens`` positions (rows x width)."""
    return max(1, -(-tokens // chunk_tokens))


def output_head(model) -> torch.nn.Module | None:
    """``model``'s lm_head when its logits are exactly ``lm_head(last hidden state)``, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in no_op for name, no_op in LOGIT_POSTPROCESSING.items()):
        return None
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None  # cannot skip the full-width logits; the model's own are used
    return head


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def student_states(engine, module, inputs: dict) -> tuple[torch.Tensor, object]:
    """(hidden states or logits, the head that maps them to logits) of the student's forward.

    ``engine`` is called (DeepSpeed's engine: its forward registers the backward hooks ZeRO needs);
    ``module`` is the model inside it, inspected for its lm_head. ``logits_to_keep=1``: the model computes
    the logits of the last position only (its own head call; ours follow per chunk).
    """
    head = output_head(module)
    if head is None:
        return engine(**inputs, use_cache=False).logits, _identity
    out = engine(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1], head


def teacher_states(teacher, inputs: dict) -> tuple[torch.Tensor, object]:
    """The same for the teacher (a plain module, no grad): its base model's last hidden state, not the
    hidden states of every layer."""
    head = output_head(teacher)
    base = getattr(teacher, getattr(teacher, "base_model_prefix", ""), None)
    with torch.no_grad():
        if head is None or not isinstance(base, torch.nn.Module):
            return teacher(**inputs, use_cache=False).logits, _identity
        return base(**inputs, use_cache=False).last_hidden_state, head


def _chunk_sums(hidden, targets, teacher_hidden, *, head, teacher_head, kd: KD | None) -> torch.Tensor:
    """(CE sum, KD sum) of one slice of positions, float32. Runs again in the backward (checkpoint)."""
    logits = head(hidden)  # model dtype; token_cross_entropy / divergence upcast this slice only
    ce = token_cross_entropy(logits, targets).sum()
    if kd is None:
        return torch.stack([ce, torch.zeros_like(ce)])
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    vocab = min(logits.shape[-1], teacher_logits.shape[-1])  # padded embedding rows may differ
    per_token = divergence(logits[..., :vocab], teacher_logits[..., :vocab], kd.kind,
                           temperature=kd.temperature, beta=kd.beta, taid_t=kd.taid_t, mask=targets != IGNORE,
                           sinkhorn_form=kd.sinkhorn_form, sinkhorn_iterations=kd.sinkhorn_iterations,
                           sinkhorn_epsilon=kd.sinkhorn_epsilon, sinkhorn_group=kd.sinkhorn_group)
    # masked by where, not by boolean indexing: no device-to-host sync for the number of targets
    kd_sum = torch.where(targets != IGNORE, per_token, torch.zeros_like(per_token)).sum()
    return torch.stack([ce, kd_sum])


def _split_points(positions: int, chunks: int, group: int) -> int | list[int]:
    """``chunks`` slices of the positions (tensor_split's argument): equal ones, or for coupled groups of
    positions slices whose boundaries are multiples of ``group`` (trailing slices may be empty: the number of
    head calls stays ``chunks``)."""
    if group <= 1:
        return chunks
    per = -(-positions // chunks)
    per = -(-per // group) * group
    return [min(k * per, positions) for k in range(1, chunks)]


def loss_sums(hidden: torch.Tensor, head, targets: torch.Tensor, *, chunks: int,
              teacher_hidden: torch.Tensor | None = None, teacher_head=None,
              kd: KD | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, KD sum) over the positions whose target is not -100, float32 scalars.

    ``hidden``: (..., positions, features) student states, ``head`` maps features to logits (identity when
    they already are logits); the same for the teacher when ``kd`` is set. Exactly ``chunks`` head calls.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    splits = _split_points(flat.shape[0], chunks, kd.group if kd is not None else 1)
    pieces = zip(torch.tensor_split(flat, splits), torch.tensor_split(flat_targets, splits),
                 torch.tensor_split(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), splits)
                 if kd is not None else [None] * chunks)
    fn = functools.partial(_chunk_sums, head=head, teacher_head=teacher_head, kd=kd)
    # no randomness in a head and a loss: no RNG state to save and restore for the recomputation
    total = sum(checkpoint(fn, h, t, th, use_reentrant=False, preserve_rng_state=False) for h, t, th in pieces)
    return total[0], total[1]
