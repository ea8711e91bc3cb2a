"""Per-token training losses: cross-entropy and the distillation divergences.

All functions take logits of shape (..., vocab) and return one value per position (summed over the vocab),
in float32; the caller masks and normalises. Temperature T softens both distributions and the divergence is
multiplied by T^2 so its gradient scale does not depend on T (Hinton et al., 2015).

- forward KL  KL(p_teacher || q_student)           mean-seeking (classic KD)
- reverse KL  KL(q_student || p_teacher)           mode-seeking (MiniLLM)
- JSD(beta)   beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (generalised, skewed JSD)
- TAID        KL(p_t || q_student), p_t = softmax((1 - t) z_student.detach() + t z_teacher): the target moves
              from the student's own distribution toward the teacher's as t rises (Shing et al., 2025); t follows
              :class:`TaidSchedule` (the paper's adaptive update, or linear)
- Sinkhorn    entropic optimal transport between the distributions (SinKD, Cui et al., 2024), log-domain
              iterations: ``batch`` form (the paper's): the token distributions of a group of positions are two
              point clouds, cost ||q_i - p_j||_1, and the loss is the transport cost <P, C> of the Sinkhorn plan;
              ``token`` form: per position, transport over the vocabulary with the 0/1 ground cost (its exact OT is
              the total variation distance), computed in O(vocab) per iteration
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# a zero-mass point's log-marginal: finite (no inf - inf = nan in the iterations), exp() of it is 0 in fp32 and bf16
_LOG_ZERO = -1e30


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
               beta: float = 0.5, taid_t: float = 0.0, mask: torch.Tensor | None = None,
               sinkhorn_form: str = "batch", sinkhorn_iterations: int = 20, sinkhorn_epsilon: float = 0.1,
               sinkhorn_group: int = 64) -> torch.Tensor:
    """Per-position divergence between student and teacher logits (same vocab size).

    ``mask`` (positions that are trained) matters only to the batch-wise Sinkhorn form, whose positions are
    coupled: untrained positions get no mass. Sinkhorn is not multiplied by T^2: it is a transport cost of
    L1 distances (at most 2 per position), not a KL whose gradient shrinks as 1/T^2."""
    t = temperature
    zs, zt = student.float() / t, teacher.float().detach() / t
    log_q, log_p = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    if kind == "sinkhorn":
        if sinkhorn_form == "token":
            return sinkhorn_token(log_q, log_p, sinkhorn_epsilon, sinkhorn_iterations)
        if sinkhorn_form == "batch":
            keep = torch.ones(log_q.shape[:-1], dtype=torch.bool, device=log_q.device) if mask is None else mask
            return sinkhorn_batch(log_q.exp(), log_p.exp(), keep, sinkhorn_epsilon, sinkhorn_iterations,
                                  sinkhorn_group)
        raise ValueError(f"unknown Sinkhorn form {sinkhorn_form!r}")
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


@dataclass
class TaidSchedule:
    """TAID's interpolation parameter t over the optimizer steps (Shing et al., 2025, Algorithm 1).

    ``adaptive`` (the paper's rule), after step n with TAID objective J_n (the mean KL(p_t || q) of the step):
        delta_n = (J_{n-1} - J_n) / (J_{n-1} + eps)          relative decrease of the objective
        m_n     = beta m_{n-1} + (1 - beta) delta_n           its momentum (m_0 = 0; delta_1 = 0: no J_0)
        t_{n+1} = min(t_end, max(t_lin(n+1), t_n + alpha sigmoid(m_n) (1 - t_n)))
    with the linear lower bound t_lin(n) = t_start + (t_end - t_start) n / (N - 1) over the N steps of the run:
    t moves toward the teacher faster while the student keeps up (J falls), never slower than linearly, and
    reaches t_end by the last step. ``linear``: t_n = t_lin(n). Defaults (the paper's): t_start 0.4,
    t_end 1.0, alpha 5e-4, beta 0.99.
    """

    start: float
    end: float
    total_steps: int
    alpha: float = 5e-4
    beta: float = 0.99
    adaptive: bool = True
    t: float | None = None
    momentum: float = 0.0
    previous: float | None = None
    eps: float = 1e-8

    def __post_init__(self):
        if self.t is None:
            self.t = self.start

    def lower_bound(self, step: int) -> float:
        return taid_weight(self.start, self.end, step / max(self.total_steps - 1, 1))

    def value(self, step: int) -> float:
        """t for (0-based) ``step``."""
        return self.lower_bound(step) if not self.adaptive else min(self.end, max(self.lower_bound(step), self.t))

    def update(self, step: int, objective: float) -> float:
        """After ``step`` with objective J: t of step + 1. A non-finite J leaves the momentum as it is."""
        if not self.adaptive:
            return self.value(step + 1)
        if math.isfinite(objective):
            delta = 0.0 if self.previous is None else (self.previous - objective) / (self.previous + self.eps)
            self.momentum = self.beta * self.momentum + (1 - self.beta) * delta
            self.previous = objective
        t = self.value(step)
        step_size = self.alpha * (1 / (1 + math.exp(-self.momentum))) * (1 - t)
        self.t = min(self.end, max(self.lower_bound(step + 1), t + step_size))
        return self.t

    def state(self) -> dict:
        return {"t": self.t, "momentum": self.momentum, "previous": self.previous}

    def restore(self, state: dict | None) -> None:
        if state:
            self.t, self.momentum, self.previous = state["t"], state["momentum"], state["previous"]


def _lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logsumexp(x, dim)


@torch.no_grad()
def sinkhorn_potentials(cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, epsilon: float,
                        iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual potentials (f, g) of entropic OT between marginals a (..., n) and b (..., m) under ``cost``
    (..., n, m), in the log domain: P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps). Only log-sum-exps of
    finite numbers, so a small eps (C / eps of hundreds) neither underflows the kernel exp(-C / eps) to 0 nor
    divides by 0, in fp32 or bf16 (the dtype of ``cost``). Ends with an f update: the rows sum exactly to a."""
    g = torch.zeros_like(log_b)
    f = torch.zeros_like(log_a)
    for _ in range(iterations):
        f = -epsilon * _lse(log_b.unsqueeze(-2) + (g.unsqueeze(-2) - cost) / epsilon, -1)
        g = -epsilon * _lse(log_a.unsqueeze(-1) + (f.unsqueeze(-1) - cost) / epsilon, -2)
    f = -epsilon * _lse(log_b.unsqueeze(-2) + (g.unsqueeze(-2) - cost) / epsilon, -1)
    return f, g


def sinkhorn_plan(cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, epsilon: float,
                  iterations: int) -> torch.Tensor:
    """The entropic transport plan (no gradient: see :func:`sinkhorn_batch`)."""
    f, g = sinkhorn_potentials(cost, log_a, log_b, epsilon, iterations)
    return torch.exp(log_a.unsqueeze(-1) + log_b.unsqueeze(-2) + (f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / epsilon)


def sinkhorn_batch(q: torch.Tensor, p: torch.Tensor, mask: torch.Tensor, epsilon: float, iterations: int,
                   group: int) -> torch.Tensor:
    """SinKD's batch-wise Sinkhorn distance, one value per position (summing to n x <P, C> per group).

    Consecutive positions (flattened) form groups of ``group``; in each, the student distributions q_i and the
    teacher distributions p_j of its trained positions are two point sets of equal mass 1/n, C_ij =
    ||q_i - p_j||_1, P the Sinkhorn plan, and the group's loss n <P, C> (= SinKD's sum(P * C) with its
    marginals of 1, the per-position scale of the other divergences). Position i carries n sum_j P_ij C_ij.
    The plan is a constant in the backward: by the envelope theorem P is the gradient of the entropic OT
    cost in C, and no unrolled iterations are stored."""
    vocab = q.shape[-1]
    shape = q.shape[:-1]
    q, p, keep = q.reshape(-1, vocab), p.reshape(-1, vocab), mask.reshape(-1)
    n = q.shape[0]
    pad = (-n) % group
    if pad:  # padding positions carry no mass
        q = torch.cat([q, q.new_zeros(pad, vocab)])
        p = torch.cat([p, p.new_zeros(pad, vocab)])
        keep = torch.cat([keep, keep.new_zeros(pad)])
    q, p, keep = q.view(-1, group, vocab), p.view(-1, group, vocab), keep.view(-1, group)
    cost = torch.cdist(q, p, p=1)  # (groups, group, group)
    count = keep.sum(-1, keepdim=True)
    # an all-untrained group gets uniform marginals (any finite problem); its positions are masked below
    mass = torch.where(count > 0, keep.float(), torch.ones_like(keep, dtype=torch.float))
    log_mass = torch.where(mass > 0, torch.log(mass / mass.sum(-1, keepdim=True)), torch.full_like(mass, _LOG_ZERO))
    plan = sinkhorn_plan(cost.detach(), log_mass, log_mass, epsilon, iterations)
    per_position = count * (plan * cost).sum(-1)
    per_position = torch.where(keep, per_position, torch.zeros_like(per_position))
    return per_position.reshape(-1)[:n].view(shape)


def sinkhorn_token(log_q: torch.Tensor, log_p: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Per-position entropic OT cost OT_eps(q, p) over the vocabulary with the 0/1 ground cost (moving mass to
    another token costs 1): min_P <P, C> + eps KL(P || q x p), which tends to the total variation distance
    1/2 ||q - p||_1 as eps -> 0.

    The kernel exp(-C / eps) is 1 on the diagonal and e = exp(-1 / eps) elsewhere, so one half-iteration is
    f_i = -eps log((1 - e) p_i exp(g_i / eps) + e sum_j p_j exp(g_j / eps)): O(vocab), in log-sum-exp form.
    Potentials without gradient; the value <f, q> + <g, p> (the dual, exact after the final f update) has
    gradient f in q, the envelope theorem's exact gradient of OT_eps."""
    with torch.no_grad():
        lq, lp = log_q.detach().clamp_min(_LOG_ZERO), log_p.clamp_min(_LOG_ZERO)
        log_off = -1.0 / epsilon
        log_on = math.log(-math.expm1(log_off)) if log_off > -50 else 0.0  # log(1 - e)

        def half(log_other: torch.Tensor, pot: torch.Tensor) -> torch.Tensor:
            h = log_other + pot / epsilon
            return -epsilon * torch.logaddexp(log_on + h, log_off + torch.logsumexp(h, -1, keepdim=True))

        g = torch.zeros_like(lp)
        f = half(lp, g)
        for _ in range(iterations - 1):
            g = half(lq, f)
            f = half(lp, g)
    return (log_q.exp() * f).sum(-1) + (log_p.exp() * g).sum(-1)
