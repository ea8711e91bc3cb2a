"""KD divergences against values computed by hand on small logits."""
from __future__ import annotations

import math

import pytest
import torch

from branchmerge.trainer.sft.losses import divergence, taid_weight, token_cross_entropy

STUDENT = [1.0, 0.0, -1.0]
TEACHER = [0.0, 2.0, 0.0]


def softmax(z, t=1.0):
    e = [math.exp(x / t) for x in z]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def value(kind, t=1.0, **kw):
    return divergence(torch.tensor([STUDENT]), torch.tensor([TEACHER]), kind, temperature=t, **kw).item()


def test_forward_and_reverse_kl():
    q, p = softmax(STUDENT), softmax(TEACHER)
    assert value("forward-kl") == pytest.approx(kl(p, q), rel=1e-5)
    assert value("reverse-kl") == pytest.approx(kl(q, p), rel=1e-5)
    assert kl(p, q) != pytest.approx(kl(q, p), rel=1e-2)  # the two directions really differ here


def test_temperature_softens_and_rescales_by_t_squared():
    q, p = softmax(STUDENT, 2.0), softmax(TEACHER, 2.0)
    assert value("forward-kl", t=2.0) == pytest.approx(4 * kl(p, q), rel=1e-5)


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
def test_skewed_jsd(beta):
    q, p = softmax(STUDENT), softmax(TEACHER)
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    assert value("jsd", beta=beta) == pytest.approx(beta * kl(p, m) + (1 - beta) * kl(q, m), rel=1e-5)


def test_jsd_is_symmetric_at_half_and_zero_for_equal_distributions():
    a, b = torch.tensor([STUDENT]), torch.tensor([TEACHER])
    assert divergence(a, b, "jsd", beta=0.5).item() == pytest.approx(divergence(b, a, "jsd", beta=0.5).item())
    assert divergence(a, a.clone(), "jsd").item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_taid_interpolates_in_logit_space(t):
    q = softmax(STUDENT)
    target = softmax([(1 - t) * s + t * x for s, x in zip(STUDENT, TEACHER)])
    assert value("taid", taid_t=t) == pytest.approx(kl(target, q), abs=1e-6)
    if t == 1.0:
        assert value("taid", taid_t=t) == pytest.approx(value("forward-kl"), rel=1e-5)


def test_taid_gradient_flows_only_through_the_student_prediction():
    s = torch.tensor([STUDENT], requires_grad=True)
    divergence(s, torch.tensor([TEACHER]), "taid", taid_t=0.5).sum().backward()
    q, target = torch.softmax(s.detach(), -1), torch.softmax(0.5 * s.detach() + 0.5 * torch.tensor([TEACHER]), -1)
    assert torch.allclose(s.grad, q - target, atol=1e-6)  # d KL(target || softmax(s)) / ds = q - target


def test_taid_weight_rises_linearly():
    assert [taid_weight(0.2, 1.0, x) for x in (0, 0.5, 1, 2)] == pytest.approx([0.2, 0.6, 1.0, 1.0])


def test_cross_entropy_ignores_masked_targets():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    ce = token_cross_entropy(logits, torch.tensor([[0, -100]]))
    assert ce[0, 0].item() == pytest.approx(-math.log(softmax([2.0, 0, 0])[0]), rel=1e-6)
    assert ce[0, 1].item() == 0.0
