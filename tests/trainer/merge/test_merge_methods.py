"""Each merge method against an independent reference written here from the published formulas
(numpy, float64), on small random tensors."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from branchmerge.trainer.merge import kernels
from branchmerge.trainer.merge.engine import tensor_seed
from branchmerge.trainer.merge.methods import METHODS, arcee_fusion
from branchmerge.trainer.merge.methods.base import MergeInputs, RowBlocks, TensorParams


def run_method(method, base, others, seed=0, name="w", **params):
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    out = METHODS[method].merge(MergeInputs(name, base, list(others), TensorParams(**params), gen))
    return out


def rand(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def np64(t):
    return t.double().numpy()


# ------------------------------------------------------------------ linear and task arithmetic: exact

def test_linear_is_exact_weighted_mean():
    # integer-valued tensors and dyadic weights: every intermediate is exactly representable
    a = torch.randint(-50, 50, (8, 6)).float()
    b = torch.randint(-50, 50, (8, 6)).float()
    out = run_method("linear", None, [a, b], weights=(1.0, 3.0), normalize=True).tensor
    assert torch.equal(out, (a + 3 * b) / 4)
    unnormalized = run_method("linear", None, [a, b], weights=(1.0, 3.0), normalize=False).tensor
    assert torch.equal(unnormalized, a + 3 * b)


def test_linear_random_matches_reference():
    ts = [rand((5, 7), s) for s in range(3)]
    w = (0.2, 0.5, 1.3)
    out = run_method("linear", None, ts, weights=w, normalize=True).tensor
    ref = sum(wk * np64(t) for wk, t in zip(w, ts)) / sum(w)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_task_arithmetic_is_exact():
    base = torch.randint(-20, 20, (6, 4)).float()
    a, b = base + torch.randint(-8, 8, (6, 4)), base + torch.randint(-8, 8, (6, 4))
    out = run_method("task_arithmetic", base, [a, b], weights=(0.5, 0.25), lambda_=2.0, normalize=False).tensor
    assert torch.equal(out, base + 2.0 * (0.5 * (a - base) + 0.25 * (b - base)))


# ------------------------------------------------------------------ TIES

def ties_reference(base, others, weights, densities, lam=1.0, normalize=True):
    b = np64(base).ravel()
    trimmed = []
    for o, d in zip(others, densities):
        delta = np64(o).ravel() - b
        k = int(d * delta.size)
        order = np.argsort(-np.abs(delta), kind="stable")
        kept = np.zeros_like(delta)
        kept[order[:k]] = delta[order[:k]]
        trimmed.append(kept)
    weighted = np.stack([w * t for w, t in zip(weights, trimmed)])
    elected = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(weighted) == elected
    mixed = (weighted * agree).sum(axis=0)
    divisor = (np.array(weights)[:, None] * agree).sum(axis=0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    return (b + lam * mixed).reshape(base.shape), agree.sum(axis=1)


@pytest.mark.parametrize("weights", [(1.0, 0.5, 2.0), (1.0, -0.5, 2.0)])  # a negative weight: no clamp shortcut
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(normalize, weights):
    base = rand((12, 10), 0)
    others = [base + rand((12, 10), s, 0.1) for s in (1, 2, 3)]
    densities = (0.3, 0.5, 0.8)
    out = run_method("ties", base, others, weights=weights, densities=densities, lambda_=0.7, normalize=normalize)
    ref, taken = ties_reference(base, others, weights, densities, 0.7, normalize)
    np.testing.assert_allclose(out.tensor.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert out.taken == list(taken)


def test_ties_trim_is_exact_count_with_equal_magnitudes():
    base = torch.zeros(100)
    other = torch.ones(100)  # every magnitude ties: still exactly int(0.37 * 100) entries kept
    out = run_method("ties", base, [other], weights=(1.0,), densities=(0.37,))
    assert int((out.tensor != 0).sum()) == 37 and out.taken == [37]


@pytest.mark.parametrize("sample", ["none", "representative", "too-low", "too-high"])
@pytest.mark.parametrize("values", ["few-distinct", "continuous"])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.37, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("blocks_as", ["tensors", "arrays"])  # the torch code's blocks, or the kernels'
def test_magnitude_cut_over_blocks_keeps_the_top_k_first_by_position(density, values, sample, blocks_as,
                                                                    monkeypatch):
    """The cut, applied block by block, keeps exactly the k largest magnitudes, ties at the threshold broken
    by position -- what a stable sort of the whole tensor would keep. Whatever the sample: selected from all
    magnitudes (none), from the bracket around a sample's estimate, or -- when a sample misleads the bracket
    -- by the radix select."""
    from branchmerge.trainer.merge.methods import _task_vectors
    g = torch.Generator().manual_seed(3)
    if values == "few-distinct":  # many ties, zeros, and values near float32 bucket edges
        palette = torch.tensor([0.0, 1e-30, 0.25, 0.5, 0.50000006, 1.0, 3.0, 1e30], dtype=torch.float32)
        delta = palette[torch.randint(len(palette), (5003,), generator=g)]
    else:
        delta = torch.randn(5003, generator=g)
    delta = delta * (torch.randint(2, (5003,), generator=g) * 2 - 1)
    magnitude = delta.abs()
    blocks = [magnitude[i:i + 700] for i in range(0, 5003, 700)]
    base = torch.zeros(5003)

    def tensor_blocks():  # (base, [other]) block by block: other - base is the delta
        return ((base[i:i + 700], [delta[i:i + 700]]) for i in range(0, 5003, 700))

    def inputs():
        if blocks_as == "arrays":
            return ((kernels.readable(b), [kernels.readable(o)]) for b, (o,) in tensor_blocks())
        return tensor_blocks()
    samples = {"none": None, "representative": [magnitude[::7].numpy().copy()],
               "too-low": [np.zeros(500, np.float32)], "too-high": [np.full(500, 1e35, np.float32)]}
    radix = _task_vectors._radix_cuts
    used_radix = []  # a spy: the real radix select runs
    monkeypatch.setattr(_task_vectors, "_radix_cuts", lambda *a: used_radix.append(1) or radix(*a))
    (cut,) = _task_vectors.magnitude_cuts(inputs, 5003, [density], samples[sample])
    if sample == "none" or (sample == "representative" and values == "continuous"):
        assert not used_radix  # the band held the cut
    if sample == "too-high" and 0 < density <= 0.5:
        assert used_radix  # nothing lies above a bracket over 1e35: the k-th largest is below it
    k = int(density * 5003)
    if cut is None:
        assert density == 1.0
        return
    fused_cut = copy.copy(cut)  # the cut counts the ties it has kept
    kept = torch.cat([cut.keep(b, torch.float32) for b in blocks]).bool()
    order = sorted(range(5003), key=lambda i: (-float(magnitude[i]), i))  # stable: ties by position
    expected = torch.zeros(5003, dtype=torch.bool)
    expected[order[:k]] = True
    assert torch.equal(kept, expected)
    # the fused kernel keeps the same entries (a kept delta is itself, a dropped one 0)
    fused = torch.cat([torch.from_numpy(_task_vectors._fused_weighted_delta(
        kernels.readable(b), kernels.readable(o), 1.0, fused_cut)) for b, (o,) in tensor_blocks()])
    assert torch.equal(fused != 0, expected & (delta != 0)) and torch.equal(fused[expected], delta[expected])


# ------------------------------------------------------------------ DARE

def dare_reference(base, others, weights, densities, seed, name, consensus, rescale=True, lam=1.0):
    """The drop masks are the documented draws: for model k of a tensor, one ``rand(shape) < density`` from a
    generator seeded with tensor_seed(seed, name) + k. Everything else follows the formulas."""
    b = np64(base).ravel()
    dropped = []
    for k, (o, d) in enumerate(zip(others, densities)):
        gen = torch.Generator().manual_seed(tensor_seed(seed, name) + k)
        delta = np64(o).ravel() - b
        keep = (torch.rand(base.shape, generator=gen, dtype=torch.float32) < d).numpy().ravel()
        kept = delta * keep
        if rescale and np.abs(kept).sum() > 0:
            kept = kept * (np.abs(delta).sum() / np.abs(kept).sum())  # L1 norm preserved
        dropped.append(kept)
    weighted = np.stack([w * t for w, t in zip(weights, dropped)])
    if consensus:
        elected = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
        agree = np.sign(weighted) == elected
        mixed = (weighted * agree).sum(axis=0)
        divisor = (np.array(weights)[:, None] * agree).sum(axis=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(axis=0), sum(weights)
    return (b + lam * mixed / divisor).reshape(base.shape)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_matches_reference_and_is_deterministic(method):
    base = rand((20, 16), 0)
    others = [base + rand((20, 16), s, 0.1) for s in (1, 2)]
    kw = dict(weights=(1.0, 0.6), densities=(0.4, 0.7), normalize=True, rescale=True, lambda_=1.0)
    first = run_method(method, base, others, seed=11, name="layer.w", **kw).tensor
    again = run_method(method, base, others, seed=11, name="layer.w", **kw).tensor
    other_seed = run_method(method, base, others, seed=12, name="layer.w", **kw).tensor
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    ref = dare_reference(base, others, kw["weights"], kw["densities"], 11, "layer.w", method == "dare_ties")
    np.testing.assert_allclose(first.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_dare_drop_rate_and_l1_rescale():
    base = torch.zeros(200_000)
    other = rand((200_000,), 3)
    out = run_method("dare_linear", base, [other], weights=(1.0,), densities=(0.3,), rescale=True)
    kept = out.tensor != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert math.isclose(out.tensor.abs().sum().item(), other.abs().sum().item(), rel_tol=1e-4)
    plain = run_method("dare_linear", base, [other], weights=(1.0,), densities=(0.3,), rescale=False).tensor
    assert torch.equal(plain[kept], other[kept])


# ------------------------------------------------------------------ SLERP

def slerp_reference(a, b, t):
    va, vb = np64(a).ravel(), np64(b).ravel()
    cos = va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb))
    if abs(cos) > 0.9995:
        return ((1 - t) * va + t * vb).reshape(a.shape)
    theta = np.arccos(cos)
    return ((np.sin((1 - t) * theta) * va + np.sin(t * theta) * vb) / np.sin(theta)).reshape(a.shape)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_reference(t):
    a, b = rand((9, 5), 0), rand((9, 5), 1)
    out = run_method("slerp", a, [b], t=t).tensor
    np.testing.assert_allclose(out.numpy(), slerp_reference(a, b, t), rtol=1e-5, atol=1e-6)


def test_slerp_falls_back_to_lerp_when_parallel():
    a = rand((50,), 0)
    b = a * 2.0 + 1e-4 * rand((50,), 1)
    out = run_method("slerp", a, [b], t=0.25).tensor
    np.testing.assert_allclose(out.numpy(), (0.75 * np64(a) + 0.25 * np64(b)), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ model stock

def test_model_stock_matches_reference():
    base = rand((10, 8), 0)
    others = [base + rand((10, 8), 5) * 0.2 + rand((10, 8), s) * 0.1 for s in (1, 2, 3)]
    out = run_method("model_stock", base, others)
    offsets = [np64(o).ravel() - np64(base).ravel() for o in others]
    cosines = [offsets[i] @ offsets[j] / (np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j]))
               for i in range(3) for j in range(i + 1, 3)]
    cos, n = float(np.mean(cosines)), 3
    t = n * cos / (1 + (n - 1) * cos)
    ref = t * np.mean([np64(o) for o in others], axis=0) + (1 - t) * np64(base)
    assert out.extra["t"] == pytest.approx(t, rel=1e-5)
    np.testing.assert_allclose(out.tensor.numpy(), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ Arcee Fusion

def fusion_scores_reference(o, b):
    o2, b2 = np64(o), np64(b)
    if o2.ndim == 1:
        o2, b2 = o2[None], b2[None]
    p = np.exp(o2 - o2.max(-1, keepdims=True)); p = p / p.sum(-1, keepdims=True) + 1e-8
    q = np.exp(b2 - b2.max(-1, keepdims=True)); q = q / q.sum(-1, keepdims=True) + 1e-8
    kl = (p * np.log(p / q)).sum(-1, keepdims=True)
    return (np.abs(o2 - b2) * kl).reshape(o.shape)


def quantile_threshold(scores):
    s = np.sort(np.asarray(scores).ravel())
    n = s.size
    q1, med, q3 = (s[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    return med + 1.5 * (q3 - q1)


def test_arcee_threshold_on_known_distribution():
    # 0..99 plus three outliers: sorted index floor(q*(n-1)) with n=103 -> Q1=25, median=51, Q3=76
    scores = torch.tensor([float(i) for i in range(100)] + [500.0, 130.0, 128.0])
    scores = scores[torch.randperm(103, generator=torch.Generator().manual_seed(0))]
    t = arcee_fusion.threshold(scores, torch.Generator())
    assert t == pytest.approx(51 + 1.5 * (76 - 25))  # 127.5: only 128, 130 and 500 pass
    assert int((scores >= t).sum()) == 3


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10, 103, 100_001])
@pytest.mark.parametrize("kind", ["continuous", "three-values"])
def test_arcee_quantiles_are_those_of_the_sorted_scores(n, kind):
    """The partial sorts pick exactly sorted[floor(q * (n - 1))], whatever the size and however many ties."""
    rng = np.random.default_rng(n)
    x = (rng.random(n) if kind == "continuous" else rng.integers(0, 3, n)).astype(np.float32)
    ordered = np.sort(x)
    q1, med, q3 = (float(ordered[int(q * (n - 1))]) for q in (0.25, 0.5, 0.75))
    assert arcee_fusion._iqr_threshold(torch.from_numpy(x)) == med + 1.5 * (q3 - q1)


def test_arcee_fusion_takes_only_outlier_rows_and_entries():
    # Known score distribution: the base is flat; every ordinary row of the other model holds the same
    # 30 offsets (|d| = 0.001..0.030, rotated), so all those rows share one KL value K and their scores are
    # {0.001..0.030}*K, 38 copies each. Two rows change strongly (large KL). Quantiles at floor(q*(n-1)),
    # n=1200: Q1=0.008K, median=0.016K, Q3=0.024K -> T=0.040K, above every ordinary score.
    base = torch.zeros(40, 30)
    pattern = torch.tensor([0.001 * (j + 1) * (-1) ** j for j in range(30)])
    other = torch.stack([pattern.roll(r) for r in range(40)])
    other[7] = 4.0 * rand((30,), 2)
    other[23] = 4.0 * rand((30,), 3)
    out = run_method("arcee_fusion", base, [other])
    scores = fusion_scores_reference(other, base)
    k = scores[0].max() / 0.030
    assert quantile_threshold(scores) == pytest.approx(0.040 * k, rel=1e-6)
    mask = scores >= quantile_threshold(scores)
    np.testing.assert_allclose(np64(arcee_fusion.importance(other, base)), scores, rtol=1e-3)
    assert mask.sum() > 10 and set(np.nonzero(mask)[0]) == {7, 23}
    np.testing.assert_array_equal(out.tensor.numpy(), np.where(mask, np64(other), np64(base)).astype(np.float32))
    assert out.taken == [int(mask.sum())] and out.taken_base == mask.size - int(mask.sum())


def test_arcee_fusion_random_matches_reference_1d_and_2d():
    for shape in [(64,), (16, 24)]:
        base, other = rand(shape, 0), rand(shape, 0) + rand(shape, 1, 0.5)
        out = run_method("arcee_fusion", base, [other]).tensor
        scores = fusion_scores_reference(other, base)
        ref = np64(base) + (np64(other) - np64(base)) * (scores >= quantile_threshold(scores))
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_arcee_fusion_samples_large_tensors_with_the_seed():
    base = rand((1100, 1000), 0)  # 1.1e6 entries > 1e6: threshold from a seeded sample
    other = base + rand((1100, 1000), 1, 0.05)
    a = run_method("arcee_fusion", base, [other], seed=5, name="big").tensor
    b = run_method("arcee_fusion", base, [other], seed=5, name="big").tensor
    assert torch.equal(a, b)
    scores = arcee_fusion.importance(other, base)
    gen = torch.Generator().manual_seed(tensor_seed(5, "big"))
    # the documented draws: one uniform position inside each of 10^6 equal runs of the flattened tensor
    runs = scores.numel() / 1_000_000
    u = torch.rand(1_000_000, generator=gen, dtype=torch.float32).numpy().astype(np.float64)
    positions = np.minimum(((np.arange(1_000_000) + u) * runs).astype(np.int64), scores.numel() - 1)
    i = np.arange(1_000_000)
    assert (positions >= np.floor(i * runs)).all() and (positions < (i + 1) * runs).all()  # one inside each run
    sample = scores.reshape(-1)[torch.from_numpy(positions)]
    t_sample = quantile_threshold(sample.numpy())
    np.testing.assert_array_equal(a.numpy(), torch.where(scores >= t_sample, other, base).numpy())
    # the sampled threshold is close to the exact one
    assert t_sample == pytest.approx(quantile_threshold(scores.numpy()), rel=0.02)


# ------------------------------------------------------------------ the task-vector family's new rows

def blocked(method, base, others, rows_per_block, seed=0, name="w", **params):
    """``method`` over blocks of ``rows_per_block`` rows (float32: the fused kernels' path where one exists)."""
    src = RowBlocks(name, tuple(base.shape), rows_per_block, lambda s, e: (base[s:e], [o[s:e] for o in others]),
                    TensorParams(**params), torch.Generator().manual_seed(tensor_seed(seed, name)),
                    compute_dtype=torch.float32)
    return src.join(METHODS[method].merge_blocks(src))


def breadcrumbs_reference(base, others, weights, densities, gammas, consensus, lam=1.0, normalize=False):
    """Model Breadcrumbs as published: per task vector, sort |delta| ascending, drop the largest
    int(gamma * n) (fewer when the density needs them) and the smallest, keep int(density * n)."""
    b = np64(base).ravel()
    kept = []
    for o, density, gamma in zip(others, densities, gammas):
        delta = np64(o).ravel() - b
        n = delta.size
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)
        order = np.argsort(np.abs(delta), kind="stable")
        mask = np.zeros(n)
        mask[order[bottom:bottom + target]] = 1
        kept.append(delta * mask)
    weighted = np.stack([w * k for w, k in zip(weights, kept)])
    if consensus:
        agree = np.sign(weighted) == np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
        mixed = (weighted * agree).sum(axis=0)
        divisor = (np.array(weights)[:, None] * agree).sum(axis=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(axis=0), sum(weights)
    return (b + lam * (mixed / divisor if normalize else mixed)).reshape(base.shape)


@pytest.mark.parametrize("rows_per_block", [400, 7])  # one block; many (the sampled bracket of the cuts)
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_matches_reference_over_blocks(method, rows_per_block, normalize):
    base = rand((400, 96), 0)
    others = [base + rand((400, 96), s, 0.1) for s in (1, 2, 3)]
    kw = dict(weights=(1.0, 0.6, 0.3), densities=(0.5, 0.2, 0.95), gammas=(0.01, 0.2, 0.3), lambda_=0.8,
              normalize=normalize)
    out = blocked(method, base, others, rows_per_block, **kw)
    ref = breadcrumbs_reference(base, others, kw["weights"], kw["densities"], kw["gammas"],
                                method == "breadcrumbs_ties", 0.8, normalize)
    np.testing.assert_allclose(out.tensor.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_breadcrumbs_keeps_the_middle_band_of_magnitudes():
    base = torch.zeros(10_000)
    other = rand((10_000,), 4)
    out = blocked("breadcrumbs", base, [other], 999, weights=(1.0,), densities=(0.3,), gammas=(0.05,)).tensor
    kept = out != 0
    assert int(kept.sum()) == 3000
    magnitude = other.abs()
    ranks = magnitude.argsort().argsort()  # 0 the smallest
    assert torch.equal(kept, (ranks >= 10_000 - 500 - 3000) & (ranks < 10_000 - 500))
    assert torch.equal(out[kept], other[kept])  # kept entries unchanged (rescale off by default)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_is_seeded_and_the_same_over_blocks(method):
    base = rand((120, 80), 0)
    others = [base + rand((120, 80), s, 0.1) for s in (1, 2)]
    kw = dict(weights=(1.0, 0.5), densities=(0.5, 0.4), epsilons=(0.2, 0.1), rescale=True, normalize=True)
    whole = run_method(method, base, others, seed=5, name="w", **kw).tensor
    assert torch.equal(whole, run_method(method, base, others, seed=5, name="w", **kw).tensor)
    assert not torch.equal(whole, run_method(method, base, others, seed=6, name="w", **kw).tensor)
    assert torch.equal(whole, blocked(method, base, others, 9, seed=5, name="w", **kw).tensor)
    vector = rand((5000,), 7)  # a vector is one row: ranked whole, even when served in blocks
    vectors = [vector + rand((5000,), 8, 0.1)]
    one = dict(weights=(1.0,), densities=(0.5,), epsilons=(0.2,))
    assert torch.equal(run_method(method, vector, vectors, seed=5, **one).tensor,
                       blocked(method, vector, vectors, 300, seed=5, **one).tensor)


def test_della_keep_probability_rises_with_rank_and_rescale_keeps_l1():
    """MagPrune: entry of rank r (0 the smallest |delta| of its row of n) kept with probability
    density - epsilon + 2 epsilon r / (n - 1); rescaled, the kept delta has the dropped one's L1 norm."""
    rows, n, density, epsilon = 400, 1000, 0.4, 0.3
    base = torch.zeros(rows, n)
    other = rand((rows, n), 9)
    out = run_method("della_linear", base, [other], seed=1, weights=(1.0,), densities=(density,),
                     epsilons=(epsilon,), rescale=False).tensor
    kept = (out != 0).double()
    ranks = other.abs().argsort(dim=1).argsort(dim=1)
    assert abs(float(kept.mean()) - density) < 0.005  # the mean probability is the density
    for lo in range(0, n, 200):  # by rank band: the formula, within 5 standard errors
        band = (ranks >= lo) & (ranks < lo + 200)
        expected = density - epsilon + 2 * epsilon * (lo + 99.5) / (n - 1)
        share = float(kept[band].mean())
        assert abs(share - expected) < 5 * math.sqrt(expected * (1 - expected) / int(band.sum())) + 1e-3, (lo, share)
    assert torch.equal(out[out != 0], other[out != 0])  # without rescale, kept entries are unchanged
    rescaled = run_method("della_linear", base, [other], seed=1, weights=(1.0,), densities=(density,),
                          epsilons=(epsilon,), rescale=True).tensor
    assert torch.equal(rescaled != 0, out != 0)  # the same draws
    assert math.isclose(float(rescaled.abs().double().sum()), float(other.abs().double().sum()), rel_tol=1e-5)
    # mergekit's rescale is one L1 ratio per tensor, not DELLA's paper's 1 / p per entry: large entries (kept
    # more often) come out larger than the delta on average, small ones smaller
    mean = sum(run_method("della_linear", base[:2], [other[:2]], seed=s, weights=(1.0,), densities=(density,),
                          epsilons=(epsilon,), rescale=True).tensor for s in range(200)) / 200
    top = ranks[:2] >= n - 100
    bottom = ranks[:2] < 100
    assert float((mean[top] / other[:2][top]).mean()) > 1.15 and float((mean[bottom] / other[:2][bottom]).mean()) < 0.6


def test_dare_rescale_keeps_the_task_vector_in_expectation():
    base, other = torch.zeros(2, 1000), rand((2, 1000), 9)
    mean = sum(run_method("dare_linear", base, [other], seed=s, weights=(1.0,), densities=(0.4,), rescale=True,
                          normalize=False).tensor for s in range(400)) / 400
    assert float((mean - other).abs().mean()) < 0.1 * float(other.abs().mean())


def sce_reference(base, others, topk):
    b = np64(base).ravel()
    tvs = np.stack([np64(o).ravel() - b for o in others])
    if topk < 1:
        var = tvs.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        mask = np.zeros(b.size)
        mask[np.argsort(-var, kind="stable")[:k]] = 1
        tvs = tvs * mask
    weights = (tvs ** 2).mean(axis=1)
    weights = np.full(len(tvs), 1 / len(tvs)) if abs(weights.sum()) < 1e-6 else weights / weights.sum()
    agree = np.sign(tvs) == np.where(tvs.sum(axis=0) >= 0, 1.0, -1.0)
    erased = weights[:, None] * agree
    return (b + (tvs * erased).sum(axis=0) / np.maximum(erased.sum(axis=0), 1e-6)).reshape(base.shape)


@pytest.mark.parametrize("topk", [0.3, 1.0])
@pytest.mark.parametrize("rows_per_block", [300, 11])
def test_sce_matches_reference_over_blocks(topk, rows_per_block):
    base = rand((300, 64), 0)
    others = [base + rand((300, 64), s, 0.1 * s) for s in (1, 2, 3)]
    out = blocked("sce", base, others, rows_per_block, select_topk=topk, weights=(1.0, 1.0, 1.0))
    np.testing.assert_allclose(out.tensor.numpy(), sce_reference(base, others, topk), rtol=1e-5, atol=1e-6)
    if topk < 1:  # the unselected entries keep the base exactly
        assert int((out.tensor != base).sum()) <= int(0.3 * base.numel())
