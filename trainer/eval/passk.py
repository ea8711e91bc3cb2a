"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k): the chance that k samples drawn
without replacement from the n contain at least one correct one. Computed as a running product so large n
never overflows and no float factorials are needed.
"""
from __future__ import annotations

import math
from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one question with ``c`` correct out of ``n`` samples (1 <= k <= n)."""
    if not 0 <= c <= n:
        raise ValueError(f"correct count {c} outside 0..{n}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside 1..{n}")
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean over questions (sample std with n-1, divided by sqrt(n)); 0 for n < 2."""
    n = len(values)
    if n < 2:
        return 0.0
    m = mean(values)
    variance = math.fsum((v - m) ** 2 for v in values) / (n - 1)
    return math.sqrt(variance / n)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
