"""Per-token training losses: cross-entropy and the distillation divergences.

All functions take logits of shape (..., vocab) and return one value per position (summed over the vocab),
in float32; the caller masks and normalises. Temperature T softens both distributions and the divergence is
multiplied by T^2 so its gradient scale does not depend on T (Hinton et al., 2015).

- forward KL  KL(p_teacher || q_student)           mean-seeking (classic KD)
- reverse KL  KL(q_student || p_teacher)           mode-seeking (MiniLLM)
- JSD(beta)   beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (generalised, skewed JSD)
- TAID        KL(p_t || q_student), p_t = softmax((1 - t) z_student.detach() + t z_teacher): the target moves
              from the student's own distribution toward the teacher's as t rises (Shing et al., 2025)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward-kl", "reverse-kl", "jsd", "taid")


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE per position; 0 where the target is -100."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="none")
    return flat.view(targets.shape)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from log-probabilities (0 * log 0 counts as 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, *, temperature: float = 1.0,
               beta: float = 0.5, taid_t: float = 0.0) -> torch.Tensor:
    """Per-position divergence between student and teacher logits (same vocab size)."""
    t = temperature
    zs, zt = student.float() / t, teacher.float().detach() / t
    log_q, log_p = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    if kind == "forward-kl":
        value = _kl(log_p, log_q)
    elif kind == "reverse-kl":
        value = _kl(log_q, log_p)
    elif kind == "jsd":
        # log m = logsumexp(log beta + log p, log(1 - beta) + log q)
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), 0)
        value = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    elif kind == "taid":
        log_target = F.log_softmax((1 - taid_t) * zs.detach() + taid_t * zt, -1)
        value = _kl(log_target, log_q)
    else:
        raise ValueError(f"unknown divergence {kind!r}")
    return value * (t * t)


def taid_weight(start: float, end: float, progress: float) -> float:
    """TAID interpolation weight: linear from ``start`` to ``end`` over training (progress in [0, 1])."""
    return start + (end - start) * min(max(progress, 0.0), 1.0)
