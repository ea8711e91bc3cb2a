"""arcee_fusion, as TinyR1 used it: take the other model's value only where it matters.

With B the base and O the other model: score = |O - B| * KL(softmax(O) + eps || softmax(B) + eps), the
softmax and KL over the last dimension (one KL per row of a 2-D tensor, broadcast along it; one value for
a 1-D tensor). Threshold T = median + 1.5 * (Q3 - Q1) of the scores, each quantile read from the sorted
scores at index floor(q * (n - 1)); above SAMPLE_SIZE entries the quantiles come from a seeded stratified
sample of SAMPLE_SIZE scores: the flattened tensor is cut into SAMPLE_SIZE equal runs and one entry is drawn
uniformly inside each (it follows the tensor's layout, is sorted by construction, so it is gathered block by
block without sorting the draws). Result = B + (O - B) * [score >= T], i.e. O where the score passes and B
elsewhere, each exactly.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from .base import MergeInputs, MergeOutput, RowBlocks

NAME = "arcee_fusion"
ANCHOR = "base"
ACCEPTS = frozenset()
EPS = 1e-8
SAMPLE_SIZE = 1_000_000
QUANTILES = (0.25, 0.5, 0.75)
KL_BLOCK_BYTES = 256 << 10  # softmax/KL temporaries a cache-sized block of rows at a time


def row_kl(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(O) + eps || softmax(B) + eps) per row (over the last dimension), in float32."""
    rows_o = other.float().reshape(-1, other.shape[-1] if other.dim() else 1)
    rows_b = base.float().reshape(rows_o.shape)
    kl = torch.empty(rows_o.shape[0], dtype=torch.float32)
    block = max(1, KL_BLOCK_BYTES // max(1, rows_o.shape[1] * 4))
    for start in range(0, rows_o.shape[0], block):
        p = torch.softmax(rows_o[start:start + block], dim=-1)
        q = torch.softmax(rows_b[start:start + block], dim=-1)
        kernels.kl_terms(kernels.flat(p), kernels.flat(q), kernels.f32(EPS))  # p + eps, (p + eps) / (q + eps)
        kl[start:start + block] = q.log_().mul_(p).sum(dim=-1)
    return kl


def scores(other: torch.Tensor, base: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """|O - B| * the row's KL, flattened row-major."""
    width = other.shape[-1] if other.dim() else 1
    return (other.float() - base.float()).abs_().reshape(-1, width).mul_(kl.unsqueeze(-1)).reshape(-1)


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The score of every entry, shaped like the inputs."""
    return scores(other, base, row_kl(other, base)).reshape(other.shape)


def sample_positions(numel: int, generator: torch.Generator) -> torch.Tensor:
    """SAMPLE_SIZE flat positions, one drawn uniformly inside each of SAMPLE_SIZE equal runs (ascending)."""
    # float32 draws (2.8x faster than float64), placed in float64
    draws = torch.rand(SAMPLE_SIZE, generator=generator, dtype=torch.float32)
    positions = torch.empty(SAMPLE_SIZE, dtype=torch.int64)
    kernels.stratified_positions(draws.numpy(), numel, positions.numpy())
    return positions


def threshold(scores: torch.Tensor, generator: torch.Generator) -> float:
    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE_SIZE:
        flat = flat[sample_positions(flat.numel(), generator)]
    return _iqr_threshold(flat)


def _iqr_threshold(flat: torch.Tensor) -> float:
    n = flat.numel()
    i1, i2, i3 = (int(q * (n - 1)) for q in QUANTILES)
    # exactly sorted[i] for the three positions, by partial sorts: the median first, then Q1 among the
    # entries below it and Q3 among those above (one np.partition with three positions took 7x as long)
    values = np.partition(flat.float().numpy(), i2)
    q1 = np.partition(values[:i2], i1)[i1] if i1 < i2 else values[i2]
    q3 = np.partition(values[i2 + 1:], i3 - i2 - 1)[i3 - i2 - 1] if i3 > i2 else values[i2]
    return float(values[i2]) + 1.5 * (float(q3) - float(q1))


def _select(base: np.ndarray, other: np.ndarray, shape: tuple[int, ...], kl: torch.Tensor, cut: float,
            dtype: torch.dtype | None) -> MergeOutput:
    """O where the score (|O - B| * the row's KL) is >= cut, B elsewhere (kernel arrays), in one pass,
    written in ``dtype`` when the kernel can (kernels.output)."""
    merged, out = kernels.output(shape, dtype)
    taken = int(kernels.fusion_select(base, other, kernels.flat(kl.contiguous()), shape[-1] if shape else 1,
                                      kernels.f32(cut), out))
    return MergeOutput(merged if dtype is None else merged.to(dtype), [taken], merged.numel() - taken)


def _as_float32(tensor: torch.Tensor) -> np.ndarray:
    return kernels.flat(tensor.float().contiguous())


def merge(inputs: MergeInputs) -> MergeOutput:
    base, (other,) = inputs.base, inputs.others
    assert base is not None
    kl = row_kl(other, base)
    return _select(_as_float32(base), _as_float32(other), tuple(other.shape), kl,
                   threshold(scores(other, base, kl), inputs.generator), base.dtype)


def merge_blocks(src: RowBlocks):
    """Two passes over blocks of rows. The first computes each row's KL (the costly part: two softmaxes) and
    the seeded sample of scores; the second selects, from |O - B| and the kept row KLs. Scores are row-local,
    so the values are those of ``merge`` on the whole tensor."""
    numel = src.numel
    if numel <= SAMPLE_SIZE:  # the exact quantiles need every score; such a tensor is small anyway
        yield merge(src.inputs(0, src.shape[0]))
        return
    per_row = numel // src.shape[0]
    width = src.shape[-1]
    drawn = sample_positions(numel, src.generator)  # the same draws as ``merge``, ascending
    sample = torch.empty(SAMPLE_SIZE, dtype=torch.float32)
    kl = torch.empty(numel // width, dtype=torch.float32)
    for start, end in src.ranges():
        inputs = src.inputs(start, end)
        (other,), base = inputs.others, inputs.base
        lo_row, hi_row = start * per_row // width, end * per_row // width
        kl[lo_row:hi_row] = row_kl(other, base)
        lo, hi = (int(torch.searchsorted(drawn, start * per_row)), int(torch.searchsorted(drawn, end * per_row)))
        kernels.fusion_scores_at(_as_float32(base), _as_float32(other), kernels.flat(kl[lo_row:hi_row]), width,
                                 (drawn[lo:hi] - start * per_row).numpy(), sample[lo:hi].numpy())
    cut = _iqr_threshold(sample)
    for start, end in src.ranges():  # the choice reads the inputs as stored when it can (no float32 copy)
        kl_rows = kl[start * per_row // width:end * per_row // width]
        arrays = kernels.block_arrays(src, start, end)
        if arrays is not None:
            base_rows, (other_rows,) = arrays
            yield _select(base_rows, other_rows, (end - start, *src.shape[1:]), kl_rows, cut, src.out_dtype)
        else:
            inputs = src.inputs(start, end)
            (other,), base = inputs.others, inputs.base
            yield _select(_as_float32(base), _as_float32(other), tuple(other.shape), kl_rows, cut, base.dtype)
