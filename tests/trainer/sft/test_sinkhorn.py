"""Sinkhorn distillation (SinKD, Cui et al., 2024): values computed by hand or by a dense reference written here."""
from __future__ import annotations

import math

import pytest
import torch

from branchmerge.trainer.sft.chunked_loss import KD, loss_sums
from branchmerge.trainer.sft.losses import divergence, sinkhorn_potentials, sinkhorn_token


def logits_of(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


P1, P2 = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]
D = sum(abs(a - b) for a, b in zip(P1, P2))  # ||p1 - p2||_1 = 1.2


@pytest.mark.parametrize("eps", [0.1, 0.5, 2.0])
def test_batch_form_two_swapped_positions_by_hand(eps):
    """Student positions (p2, p1), teacher positions (p1, p2): C = [[d, 0], [0, d]]. The doubly stochastic
    scaling of K = [[k, 1], [1, k]] (k = exp(-d / eps)) with marginals 1/2 is P = [[k, 1], [1, k]] / (2 (1 + k)),
    so <P, C> = k d / (1 + k) and the two positions carry n <P, C> = 2 k d / (1 + k)."""
    student, teacher = logits_of([P2, P1]), logits_of([P1, P2])
    value = divergence(student, teacher, "sinkhorn", sinkhorn_group=2, sinkhorn_epsilon=eps, sinkhorn_iterations=50)
    k = math.exp(-D / eps)
    assert value.sum().item() == pytest.approx(2 * k * D / (1 + k), rel=1e-5)
    assert value[0].item() == pytest.approx(value[1].item(), rel=1e-5)


def test_batch_form_small_epsilon_is_exact_transport_and_stays_finite():
    """eps = 0.001: exp(-C / eps) = exp(-1200) is 0 in fp32, so plain (kernel) Sinkhorn divides 0 by 0; the
    log-domain iterations give the exact optimal transport: the swap costs nothing."""
    student, teacher = logits_of([P2, P1]), logits_of([P1, P2])
    cost = torch.tensor([[D, 0.0], [0.0, D]])
    kernel = torch.exp(-cost / 0.001)
    naive = kernel.clone()
    naive[0] = 0.0  # where the plain kernel's row is all underflow (here: any cost above ~0.09)
    assert torch.isnan(naive / naive.sum(1, keepdim=True)).any()
    value = divergence(student, teacher, "sinkhorn", sinkhorn_group=2, sinkhorn_epsilon=0.001)
    assert value.isfinite().all() and value.sum().item() == pytest.approx(0.0, abs=1e-6)
    # identical positions: both plans are the identity, exact OT 0; a uniform plan would cost d / 2
    same = divergence(teacher, teacher, "sinkhorn", sinkhorn_group=2, sinkhorn_epsilon=0.001)
    assert same.sum().item() == pytest.approx(0.0, abs=1e-6)


def test_batch_form_ignores_untrained_positions():
    student, teacher = logits_of([P2, P1, [0.3, 0.3, 0.4]]), logits_of([P1, P2, [0.9, 0.05, 0.05]])
    mask = torch.tensor([True, True, False])
    with_extra = divergence(student, teacher, "sinkhorn", mask=mask, sinkhorn_group=3, sinkhorn_epsilon=0.5)
    alone = divergence(student[:2], teacher[:2], "sinkhorn", sinkhorn_group=2, sinkhorn_epsilon=0.5)
    assert with_extra[2].item() == 0.0
    torch.testing.assert_close(with_extra[:2], alone, rtol=1e-5, atol=1e-6)
    nothing = divergence(student, teacher, "sinkhorn", mask=torch.zeros(3, dtype=torch.bool), sinkhorn_group=3)
    assert nothing.isfinite().all() and nothing.abs().sum().item() == 0.0


def dense_entropic_ot(q: torch.Tensor, p: torch.Tensor, eps: float, iterations: int = 3000) -> torch.Tensor:
    """Reference: min_P <P, C> + eps KL(P || q x p) with the dense 0/1 cost, plain log-domain Sinkhorn in
    float64, differentiable (unrolled)."""
    v = q.shape[-1]
    cost = 1 - torch.eye(v, dtype=torch.float64)
    lq, lp = q.log(), p.log()
    f = torch.zeros(v, dtype=torch.float64)
    g = torch.zeros(v, dtype=torch.float64)
    for _ in range(iterations):
        f = -eps * torch.logsumexp(lp[None, :] + (g[None, :] - cost) / eps, 1)
        g = -eps * torch.logsumexp(lq[:, None] + (f[:, None] - cost) / eps, 0)
    log_plan = lq[:, None] + lp[None, :] + (f[:, None] + g[None, :] - cost) / eps
    plan = log_plan.exp()
    return (plan * cost).sum() + eps * (plan * (log_plan - lq[:, None] - lp[None, :])).sum()


@pytest.mark.parametrize("eps", [0.3, 1.0])
def test_token_form_matches_the_dense_entropic_transport(eps):
    zq = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.3], dtype=torch.float64, requires_grad=True)
    zp = torch.tensor([1.5, 0.2, -0.5, 0.7, 0.0], dtype=torch.float64)
    ref = dense_entropic_ot(torch.softmax(zq, -1), torch.softmax(zp, -1), eps)
    (ref_grad,) = torch.autograd.grad(ref, zq)
    zq2 = zq.detach().clone().requires_grad_(True)
    got = sinkhorn_token(torch.log_softmax(zq2, -1), torch.log_softmax(zp, -1), eps, 500)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(zq2.grad, ref_grad, rtol=1e-4, atol=1e-6)  # the envelope gradient is exact


def test_token_form_tends_to_total_variation():
    q, p = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    tv = 0.5 * (q - p).abs().sum().item()  # 0.4: exact OT with the 0/1 cost
    value = divergence(q.log()[None], p.log()[None], "sinkhorn", sinkhorn_form="token", sinkhorn_epsilon=0.005,
                       sinkhorn_iterations=200)
    assert value.item() == pytest.approx(tv, abs=0.01)
    same = divergence(p.log()[None], p.log()[None], "sinkhorn", sinkhorn_form="token", sinkhorn_epsilon=0.005)
    assert same.item() == pytest.approx(0.0, abs=0.01)


@pytest.mark.parametrize("form", ["batch", "token"])
def test_bf16_logits_give_finite_values_close_to_fp32(form):
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 8, 300) * 4, torch.randn(4, 8, 300) * 4
    kw = dict(sinkhorn_form=form, sinkhorn_group=8, sinkhorn_epsilon=0.01, sinkhorn_iterations=30)
    s16 = student.bfloat16().requires_grad_(True)
    v16 = divergence(s16, teacher.bfloat16(), "sinkhorn", **kw)
    v16.sum().backward()
    v32 = divergence(student.bfloat16().float(), teacher.bfloat16().float(), "sinkhorn", **kw)
    assert v16.isfinite().all() and s16.grad.isfinite().all() and s16.grad.abs().sum() > 0
    torch.testing.assert_close(v16, v32, rtol=1e-5, atol=1e-5)


def test_log_domain_iterations_themselves_run_in_bf16():
    """Potentials computed in bf16 stay finite where the kernel exp(-C / eps) underflows (eps 0.005, C / eps up
    to 400); at eps 0.05 the bf16 plan keeps the marginals to a few percent (bf16's 8-bit mantissa, amplified by
    1 / eps, bounds that: the training path runs the iterations in fp32 whatever the model's dtype)."""
    torch.manual_seed(1)
    cost = torch.rand(3, 6, 6).bfloat16() * 2
    log_m = torch.full((3, 6), -math.log(6)).bfloat16()
    f, g = sinkhorn_potentials(cost, log_m, log_m, 0.005, 50)
    assert f.dtype == torch.bfloat16 and f.isfinite().all() and g.isfinite().all()
    assert torch.exp(-cost.float() / 0.005).min() == 0  # the kernel form would divide by 0
    f, g = sinkhorn_potentials(cost, log_m, log_m, 0.05, 50)
    log_plan = log_m.float()[..., :, None] + log_m.float()[..., None, :] + (
        f.float()[..., :, None] + g.float()[..., None, :] - cost.float()) / 0.05
    torch.testing.assert_close(log_plan.exp().sum(-1), torch.full((3, 6), 1 / 6), atol=0.03, rtol=0)


def test_chunking_keeps_the_batch_groups():
    """Chunk boundaries fall on multiples of the group: 1 chunk and 3 chunks give the same sums."""
    torch.manual_seed(2)
    hidden, teacher = torch.randn(2, 21, 40), torch.randn(2, 21, 40)
    targets = torch.randint(0, 40, (2, 21))
    targets[0, :3] = -100
    kd = KD("sinkhorn", sinkhorn_group=4, sinkhorn_epsilon=0.2)
    head = torch.nn.Identity()
    one = loss_sums(hidden, head, targets, chunks=1, teacher_hidden=teacher, teacher_head=head, kd=kd)
    three = loss_sums(hidden, head, targets, chunks=3, teacher_hidden=teacher, teacher_head=head, kd=kd)
    many = loss_sums(hidden, head, targets, chunks=20, teacher_hidden=teacher, teacher_head=head, kd=kd)
    torch.testing.assert_close(torch.stack(one), torch.stack(three), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(one), torch.stack(many), rtol=1e-5, atol=1e-5)
