import math
from fractions import Fraction

import pytest

from branchmerge.trainer.eval.aggregate import SampleOutcome, overall_score, summarize
from branchmerge.trainer.eval.passk import pass_at_k, percentile, standard_error


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 0, 1, 0.0), (5, 0, 5, 0.0), (5, 5, 1, 1.0), (5, 5, 3, 1.0),
    (4, 1, 1, 0.25), (4, 1, 2, 0.5), (4, 1, 3, 0.75), (4, 1, 4, 1.0),  # 1 - C(3,k)/C(4,k)
    (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252
    (16, 2, 4, 0.45),  # 1 - C(14,4)/C(16,4) = 1 - 1001/1820
    (16, 1, 1, 1 / 16), (2, 1, 2, 1.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_exact_binomial_ratio():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_1_is_the_fraction_correct_and_large_n_is_stable():
    assert pass_at_k(1024, 100, 1) == pytest.approx(100 / 1024)
    assert 0.0 <= pass_at_k(1024, 1, 512) <= 1.0
    assert pass_at_k(1024, 1, 512) == pytest.approx(0.5)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_standard_error_and_percentile():
    assert standard_error([0.25, 0.75]) == pytest.approx(0.25)
    assert standard_error([1.0]) == 0.0
    assert standard_error([0.5, 0.5, 0.5]) == 0.0
    assert percentile([10, 20, 30, 40, 50, 60, 70, 80], 95) == pytest.approx(76.5)
    assert percentile([7], 95) == 7
    assert percentile([], 95) == 0.0


def _q(flags, tokens, truncated=()):
    return [SampleOutcome(bool(f), t, i in truncated) for i, (f, t) in enumerate(zip(flags, tokens))]


def test_summarize_two_questions_by_hand():
    questions = [_q([1, 0, 0, 0], [10, 20, 30, 40], truncated={3}),
                 _q([1, 1, 0, 1], [50, 60, 70, 80], truncated={2})]
    s = summarize(questions)
    assert s["pass1"] == pytest.approx(0.5)  # (1/4 + 3/4) / 2
    assert s["stderr"] == pytest.approx(0.25)  # sqrt(var([.25, .75]) / 2), var with n-1
    assert s["passAtK"]["1"] == pytest.approx(0.5)
    assert s["passAtK"]["2"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["passAtK"]["3"] == pytest.approx((0.75 + 1.0) / 2)
    assert s["passAtK"]["4"] == pytest.approx(1.0)
    assert list(s["passAtK"]) == ["1", "2", "3", "4"]
    assert (s["n"], s["samples"], s["correct"]) == (2, 4, 4)
    assert s["meanTokens"] == pytest.approx(45.0)
    assert s["p95Tokens"] == pytest.approx(76.5)
    assert s["truncated"] == pytest.approx(0.25)


def test_summarize_single_sample_and_overall_score():
    s = summarize([_q([1], [5]), _q([0], [7]), _q([0], [9])])
    assert s["pass1"] == pytest.approx(1 / 3)
    assert s["passAtK"] == {"1": pytest.approx(1 / 3)}
    assert s["truncated"] == 0.0
    assert overall_score([{"pass1": 0.2}, {"pass1": 0.6}]) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([[]])
