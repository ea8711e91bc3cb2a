"""TAID's interpolation parameter (Shing et al., 2025, Algorithm 1) against the paper's update written out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from branchmerge.trainer.sft.losses import TaidSchedule, divergence


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_adaptive_update_follows_the_papers_rule_step_by_step():
    # N = 101 steps: the linear lower bound rises 0.6 / 100 = 0.006 per step, below the adaptive steps here
    sched = TaidSchedule(0.4, 1.0, 101, alpha=0.1, beta=0.5)
    assert sched.value(0) == 0.4
    # step 0, J = 2: no J_{-1}, delta = 0, m = 0; t = 0.4 + 0.1 * sigmoid(0) * 0.6 = 0.43 (lower bound 0.406)
    assert sched.update(0, 2.0) == pytest.approx(0.43)
    # step 1, J = 1: delta = (2 - 1) / 2 = 0.5, m = 0.5 * 0 + 0.5 * 0.5 = 0.25
    t2 = 0.43 + 0.1 * sigmoid(0.25) * (1 - 0.43)
    assert sched.update(1, 1.0) == pytest.approx(t2)
    assert t2 == pytest.approx(0.4620441, abs=1e-6)
    # step 2, J = 1: delta = 0, m = 0.125
    t3 = t2 + 0.1 * sigmoid(0.125) * (1 - t2)
    assert sched.update(2, 1.0) == pytest.approx(t3)
    assert sched.value(3) == pytest.approx(t3)
    assert sched.momentum == pytest.approx(0.125)


def test_linear_schedule_is_the_lower_bound():
    sched = TaidSchedule(0.2, 0.8, 7, adaptive=False)
    assert [sched.value(n) for n in range(7)] == pytest.approx([0.2 + 0.1 * n for n in range(7)])
    assert sched.update(3, 5.0) == pytest.approx(0.6)  # the objective does not move a linear t


def test_bounds_and_adaptation():
    n = 50
    rising, falling = TaidSchedule(0.4, 0.9, n, alpha=0.05), TaidSchedule(0.4, 0.9, n, alpha=0.05)
    for step in range(n - 1):
        t_r = rising.update(step, 1.0 + step)  # the student falls behind: J grows
        t_f = falling.update(step, 1.0 / (1 + step))  # the student keeps up: J falls
        low = 0.4 + 0.5 * (step + 1) / (n - 1)
        assert low - 1e-12 <= t_r <= 0.9 and low - 1e-12 <= t_f <= 0.9
        assert t_f >= t_r - 1e-12
    assert falling.value(n - 1) == pytest.approx(0.9) and rising.value(n - 1) == pytest.approx(0.9)
    mid_r, mid_f = TaidSchedule(0.4, 0.9, n, alpha=0.05), TaidSchedule(0.4, 0.9, n, alpha=0.05)
    for step in range(5):
        mid_r.update(step, 1.0 + step)
        mid_f.update(step, 1.0 / (1 + step))
    assert mid_f.value(5) > mid_r.value(5) > 0.4 + 0.5 * 5 / (n - 1)  # adapts faster when J falls


def test_non_finite_objective_keeps_the_momentum():
    sched = TaidSchedule(0.4, 1.0, 100, alpha=0.1)
    sched.update(0, 2.0)
    sched.update(1, 1.0)
    m = sched.momentum
    sched.update(2, float("nan"))
    assert sched.momentum == m and sched.previous == 1.0


def test_state_round_trip():
    a = TaidSchedule(0.4, 1.0, 100, alpha=0.1)
    for step, j in enumerate([3.0, 2.0, 1.5]):
        a.update(step, j)
    b = TaidSchedule(0.4, 1.0, 100, alpha=0.1)
    b.restore(a.state())
    assert b.update(3, 1.0) == a.update(3, 1.0)


def test_taid_target_interpolates_logits():
    # KL(p_t || q) with p_t = softmax((1 - t) z_s + t z_t), written out for one position of 3 tokens
    zs, zt = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    t = 0.3
    pt = torch.softmax(0.7 * zs + 0.3 * zt, -1)
    q = torch.softmax(zs, -1)
    ref = (pt * (pt.log() - q.log())).sum()
    assert divergence(zs, zt, "taid", taid_t=t).item() == pytest.approx(ref.item(), rel=1e-6)
