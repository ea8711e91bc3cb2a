"""The fused numba kernels give bit for bit what the methods' torch code gives (which the reference tests in
test_merge_methods.py check against the formulas): same operations, same order, float32, no fast-math --
also when they read bfloat16 inputs as stored instead of a float32 copy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from branchmerge.trainer.merge import kernels
from branchmerge.trainer.merge.engine import tensor_seed
from branchmerge.trainer.merge.methods import METHODS, arcee_fusion
from branchmerge.trainer.merge.methods.base import RowBlocks, TensorParams


def quantized(shape, generator, scale):
    """Values on a coarse grid, as deltas of bfloat16 models are: many equal magnitudes, exact zeros."""
    return torch.randint(-6, 7, shape, generator=generator).float() * scale


def inputs(count, shape=(300, 130), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    others = [base + quantized(shape, g, 1e-3) for _ in range(count)]
    return base, others


def run_blocked(method, base, others, params, rows_per_block=37, fused=True, monkeypatch=None,
                compute=torch.float32, out=None):
    """The method over blocks of rows, its inputs stored as given and computed in ``compute`` (as the engine
    serves them), the result cast to ``out`` as the engine does; ``fused=False`` keeps the torch code."""
    if not fused:
        monkeypatch.setattr(kernels, "block_arrays", lambda src, start, end: None)

    def stored(s, e):
        return base[s:e], [o[s:e] for o in others]

    def load(s, e):
        return base[s:e].to(compute), [o[s:e].to(compute) for o in others]

    src = RowBlocks("w", tuple(base.shape), rows_per_block, load, params,
                    torch.Generator().manual_seed(tensor_seed(0, "w")), compute_dtype=compute, load_stored=stored,
                    out_dtype=out)
    outs = list(METHODS[method].merge_blocks(src))
    monkeypatch.undo()
    joined = src.join(iter(outs))
    if out is not None:
        joined.tensor = joined.tensor.to(out)
    return joined


CASES = [
    ("ties", 2, dict(weights=(1.0, 0.5), densities=(0.5, 0.3))),
    ("ties", 3, dict(weights=(0.7, 0.2, 0.1), densities=(0.37, 0.9, 0.05), lambda_=0.8)),
    ("ties", 2, dict(weights=(1.0, -0.4), densities=(0.6, 0.6))),  # a negative weight: no clamp shortcut
    ("ties", 1, dict(weights=(1.0,), densities=(0.2,), normalize=False)),
    ("ties", 2, dict(weights=(1.0, 1.0), densities=(1.0, 0.0))),  # keep all / keep nothing
    ("task_arithmetic", 3, dict(weights=(0.5, 0.3, 0.2), lambda_=1.5)),
    ("task_arithmetic", 2, dict(weights=(1.0, -1.0), normalize=True)),
    ("dare_ties", 2, dict(weights=(1.0, 0.5), densities=(0.5, 0.3))),
    ("dare_linear", 3, dict(weights=(0.5, 0.3, 0.2), densities=(0.6, 0.6, 0.9), normalize=False)),
]


@pytest.mark.parametrize("method,count,params", CASES)
@pytest.mark.parametrize("rows_per_block", [300, 37])
@pytest.mark.parametrize("stored,out", [(torch.float32, None), (torch.bfloat16, None),
                                        (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)])
def test_task_vector_kernels_equal_the_torch_code(method, count, params, rows_per_block, stored, out,
                                                  monkeypatch):
    base, others = inputs(count)
    base, others = base.to(stored), [o.to(stored) for o in others]
    tp = TensorParams(**params)
    fused = run_blocked(method, base, others, tp, rows_per_block, True, monkeypatch, out=out)
    reference = run_blocked(method, base, others, tp, rows_per_block, False, monkeypatch, out=out)
    assert torch.equal(fused.tensor, reference.tensor)  # bit for bit (NaN-free inputs)
    assert fused.taken == reference.taken


def test_arcee_fusion_kernels_equal_the_torch_formula():
    """The select and the sampled scores against torch's arithmetic on the same row KLs."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, 96, generator=g)
    other = base + quantized((64, 96), g, 0.05)
    kl = arcee_fusion.row_kl(other, base)
    scores = (other - base).abs() * kl.unsqueeze(-1)
    cut = float(scores.median())
    merged = torch.empty_like(base)
    taken = kernels.fusion_select(kernels.flat(base), kernels.flat(other), kernels.flat(kl), 96,
                                  kernels.f32(cut), kernels.flat(merged))
    take = scores >= cut
    assert torch.equal(merged, torch.where(take, other, base)) and taken == int(take.sum())
    positions = torch.tensor([0, 5, 95, 96, 1000, 64 * 96 - 1])
    picked = np.empty(positions.numel(), np.float32)
    kernels.fusion_scores_at(kernels.flat(base), kernels.flat(other), kernels.flat(kl), 96, positions.numpy(),
                             picked)
    assert torch.equal(torch.from_numpy(picked), scores.reshape(-1)[positions])


def test_magnitude_band_counts_above_and_keeps_the_band_in_order():
    g = torch.Generator().manual_seed(1)
    base = torch.zeros(5000)
    other = quantized((5000,), g, 0.25)
    band = np.empty(5001, np.float32)
    above, count = kernels.magnitude_band(kernels.flat(base), kernels.flat(other), kernels.f32(0.5),
                                          kernels.f32(1.0), band)
    m = other.abs()
    assert above == int((m > 1.0).sum())
    assert torch.equal(torch.from_numpy(band[:count]), m[(m >= 0.5) & (m <= 1.0)])


@pytest.mark.parametrize("compute,stored", [(torch.bfloat16, torch.bfloat16), (torch.float64, torch.float32),
                                            (torch.float32, torch.float16)])
def test_other_dtypes_keep_the_torch_code(compute, stored, monkeypatch):
    """The float32 kernels run only for a float32 computation over float32 or bfloat16 inputs."""
    calls = []
    monkeypatch.setattr(kernels, "consensus_mix", lambda *a: calls.append(a))
    base, others = inputs(2)
    out = run_blocked("ties", base.to(stored), [o.to(stored) for o in others],
                      TensorParams(weights=(1.0, 0.5), densities=(0.5, 0.5)), 37, True, monkeypatch, compute)
    assert out.tensor.dtype == compute and not calls


@pytest.mark.parametrize("stored,out", [(torch.float32, None), (torch.bfloat16, torch.bfloat16)])
def test_arcee_fusion_over_blocks_equals_the_torch_code(stored, out, monkeypatch):
    """A tensor above the sample size (blocked, sampled quantiles), read as stored or cast first."""
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(1100, 1000, generator=g) * 0.02).to(stored)
    spikes = (torch.rand(1100, 1000, generator=g) < 0.02) * 0.05  # heavy tails: outlier scores exist
    other = (base.float() + torch.randn(1100, 1000, generator=g) * 1e-3 + spikes).to(stored)
    fused = run_blocked("arcee_fusion", base, [other], TensorParams(), 150, True, monkeypatch, out=out)
    reference = run_blocked("arcee_fusion", base, [other], TensorParams(), 150, False, monkeypatch, out=out)
    assert torch.equal(fused.tensor, reference.tensor) and fused.taken == reference.taken
    assert 0 < fused.taken[0] < base.numel()


def test_arcee_row_kl_and_sample_positions_equal_the_torch_formulas():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(70, 2000, generator=g)  # several of row_kl's blocks of rows
    other = base + torch.randn(70, 2000, generator=g) * 0.1
    p = torch.softmax(other, dim=-1).add_(arcee_fusion.EPS)
    q = torch.softmax(base, dim=-1).add_(arcee_fusion.EPS)
    assert torch.equal(arcee_fusion.row_kl(other, base), torch.div(p, q).log_().mul_(p).sum(dim=-1))
    for numel in (arcee_fusion.SAMPLE_SIZE + 1, 3 * arcee_fusion.SAMPLE_SIZE + 7, 10 ** 9 + 3):
        draws = torch.rand(arcee_fusion.SAMPLE_SIZE, generator=torch.Generator().manual_seed(numel),
                           dtype=torch.float32)
        expected = (torch.arange(arcee_fusion.SAMPLE_SIZE, dtype=torch.float64).add_(draws)
                    .mul_(numel / arcee_fusion.SAMPLE_SIZE).long().clamp_(max=numel - 1))
        positions = arcee_fusion.sample_positions(numel, torch.Generator().manual_seed(numel))
        assert torch.equal(positions, expected)


def test_bfloat16_results_are_rounded_as_torch_casts():
    """Results written as bfloat16 by the kernels: round to nearest even, ties, overflow to inf, NaN."""
    specials = torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.005859375, 1.0029296875, 3.3895314e38, 3.4e38,
                             -3.4e38, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-45])
    values = torch.cat([specials, torch.randn(10_000, generator=torch.Generator().manual_seed(4)) * 1e3])
    zero = torch.zeros_like(values)
    result, out = kernels.output(tuple(values.shape), torch.bfloat16)
    kernels.sum_mix(kernels.flat(zero), (kernels.flat(values),), kernels.f32(1.0), False, kernels.f32(1.0), False,
                    out, np.zeros(1, np.int64))
    assert torch.equal(result.view(torch.int16), (values + zero).to(torch.bfloat16).view(torch.int16))
