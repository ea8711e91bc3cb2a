"""The task-vector family, mergekit's "generalized task arithmetic": one core, and each method a row of it.

Task vectors: delta_k = theta_k - theta_base. A row picks a sparsification of each delta (none; the
``density`` largest magnitudes, TIES; a seeded Bernoulli(density) draw, DARE; the largest ``gamma`` dropped
as outliers then the smallest down to ``density``, Model Breadcrumbs; a seeded draw whose keep probability
rises with the magnitude's rank in its row from density - epsilon to density + epsilon, DELLA), optionally
rescaled to keep each delta's L1 norm; whether a sign is elected per entry (the deltas that agree with the
sign of the weighted sum are kept, TIES); and whether the mix is divided by the summed weights of what was
kept (normalize). The result is base + lambda * mix. ``TaskVectorMethod`` is such a row; the method
modules (task_arithmetic, ties, dare_*, breadcrumbs*, della*) only declare theirs.

Everything runs over blocks of rows small enough to stay in the CPU cache: a merge is a dozen elementwise
passes, and done on whole tensors each pass would stream the tensor through main memory again. What needs
the whole tensor (the magnitude cuts, the L1 rescale) is gathered in counting passes first, so memory
does not grow with the tensor either. In float32 over float32 or bfloat16 inputs (the usual case) a block's
passes are fused kernels (``kernels``) with the same arithmetic; the torch code below serves other dtypes
and is what the kernels are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch

from .. import kernels
from .base import MergeOutput, RowBlocks

RESCALE_EPS = 1e-7
HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16


@dataclass
class MagnitudeCut:
    """Keeps exactly the k largest |delta| of a tensor: every entry above ``threshold`` and, of the entries
    equal to it, the first ``ties`` by position (deterministic; bf16 deltas have many equal magnitudes).
    Applied to the blocks of the tensor in row order."""

    threshold: float
    ties: int
    all_ties: bool  # every entry equal to the threshold is kept: no position bookkeeping needed

    def keep(self, magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """1 for the kept entries of this block, 0 elsewhere, in ``dtype``."""
        if self.all_ties:
            return _mask(torch.ge, magnitude, self.threshold, dtype)
        keep = _mask(torch.gt, magnitude, self.threshold, dtype)
        if self.ties > 0:  # numpy finds the few equal entries ~7x faster than torch.nonzero (measured)
            at = np.flatnonzero(magnitude.reshape(-1).numpy() == np.float32(self.threshold))[:self.ties]
            keep.view(-1)[torch.from_numpy(at)] = 1
            self.ties -= at.size
        return keep


def _mask(compare, tensor: torch.Tensor, other, dtype: torch.dtype) -> torch.Tensor:
    """A comparison as 1/0 numbers: torch's CPU kernels that write bool tensors are several times slower
    than the same comparison written straight into a float tensor (measured), and the result is multiplied
    into floats anyway."""
    return compare(tensor, other, out=torch.empty(tensor.shape, dtype=dtype))


# The cut of a large tensor is bracketed from a sample of its |delta| first: one pass then counts what lies
# above the bracket and keeps what lies inside it (a few percent), and the k-th largest is picked from those.
SAMPLE_ENTRIES = 1 << 16
SAMPLE_CHUNKS = 32  # the sample is this many runs of rows spread over the tensor (one load each)
BRACKET_SIGMAS = 5.0  # half-width of the bracket in standard errors of the sample quantile...
BRACKET_SLACK = 0.005  # ...plus this much, because rows of real deltas differ (the sample is not iid)


# One pass over a tensor: per block, (base, [each other model]) as numpy arrays the kernels read
# (kernels.block_arrays) or as tensors in the compute dtype for the torch code.
Inputs = Callable[[], Iterator[tuple]]


def magnitude_cuts(inputs: Inputs, numel: int, densities: list[float],
                   sample: list[np.ndarray] | None = None) -> list[MagnitudeCut | None]:
    """Per model, the cut keeping ``int(density * numel)`` entries (None: keep everything)."""
    return top_k_cuts(inputs, numel, [int(d * numel) if d < 1 else None for d in densities], sample)


def top_k_cuts(inputs: Inputs, numel: int, ks: list[int | None],
               sample: list[np.ndarray] | None = None) -> list[MagnitudeCut | None]:
    """Per model, the cut keeping its ``ks[i]`` largest |delta| (None: keep everything; 0: nothing).

    ``inputs()`` yields, block by block in row order, (base, [each other model]). Without a ``sample``
    every magnitude is kept and the cut is selected from all of them (for a tensor served as one block).
    With a sample (per model, |delta| of a spread of rows), one pass keeps only the magnitudes inside a
    bracket around the sample's estimate of the cut; when the cut is not inside it (a sample very unlike
    the tensor), an exact radix select over two more passes finds it in fixed memory.
    """
    ks = [None if k is not None and k >= numel else k for k in ks]
    active = [i for i, k in enumerate(ks) if k]
    cuts: list[MagnitudeCut | None] = [None if k is None else MagnitudeCut(float("inf"), 0, False) for k in ks]
    if not active:  # keep all, or nothing (nothing is above infinity)
        return cuts
    bounds = {i: _bracket(sample[i], ks[i], numel) if sample is not None else (-np.inf, np.inf) for i in active}
    above = {i: 0 for i in active}
    bands: dict[int, list[np.ndarray]] = {i: [] for i in active}
    for base, others in inputs():
        for i in active:
            lo, hi = bounds[i]
            if hi == np.inf and lo == -np.inf:
                bands[i].append(_magnitude(base, others[i]).reshape(-1).numpy())
            elif isinstance(base, np.ndarray):
                band = np.empty(base.size + 1, np.float32)
                count, kept = kernels.magnitude_band(base, others[i], kernels.f32(lo), kernels.f32(hi), band)
                above[i] += count
                bands[i].append(band[:kept].copy())
            else:
                values = _magnitude(base, others[i]).reshape(-1).numpy()
                above[i] += int(np.count_nonzero(values > hi))
                bands[i].append(values[(values >= lo) & (values <= hi)])
    missed = []
    for i in active:
        cut = _cut_in_band(ks[i], above[i], np.concatenate(bands[i]) if bands[i] else np.empty(0, np.float32))
        bands[i] = []
        if cut is None:
            missed.append(i)
        else:
            cuts[i] = cut
    if missed:
        def magnitudes() -> Iterator[list[torch.Tensor]]:
            return ([_magnitude(base, other) for other in others] for base, others in inputs())

        for i, cut in zip(missed, _radix_cuts(magnitudes, [ks[i] for i in missed], missed)):
            cuts[i] = cut
    return cuts


def _magnitude(base, other) -> torch.Tensor:
    """|other - base| in float32 (the delta taken in the compute dtype), of tensors or kernel arrays."""
    if isinstance(base, np.ndarray):
        out = np.empty(base.size, np.float32)
        kernels.abs_delta(base, other, out)
        return torch.from_numpy(out)
    return (other - base).abs().float()


def _bracket(sample: np.ndarray, k: int, numel: int) -> tuple[float, float]:
    """(lo, hi) that hold the k-th largest |delta| with near certainty, from a sample of the tensor's."""
    q = 1.0 - k / numel  # the share of entries below the cut
    half = BRACKET_SIGMAS * float(np.sqrt(q * (1 - q) / max(1, sample.size))) + BRACKET_SLACK
    ordered = np.sort(sample)
    lo = float(ordered[int((q - half) * ordered.size)]) if q - half > 0 else -np.inf
    hi = float(ordered[min(ordered.size - 1, int(np.ceil((q + half) * ordered.size)))]) if q + half < 1 else np.inf
    return lo, hi


def _cut_in_band(k: int, above: int, band: np.ndarray) -> MagnitudeCut | None:
    """The cut from the ``above`` entries over the bracket and the ``band`` inside it; None when the k-th
    largest entry is not in the band."""
    rank = k - above  # the cut's rank inside the band, from the top
    if rank <= 0 or rank > band.size:
        return None
    at = band.size - rank
    threshold = np.partition(band, at)[at]
    ties = k - above - int(np.count_nonzero(band > threshold))
    return MagnitudeCut(float(threshold), ties, all_ties=ties == int(np.count_nonzero(band == threshold)))


def _radix_cuts(magnitudes: Callable[[], Iterator[list[torch.Tensor]]], ks: list[int],
                which: list[int]) -> list[MagnitudeCut]:
    """Exact cuts of models ``which`` (their ``ks``) by a radix select: the bit patterns of non-negative
    floats sort like the numbers, so two counting passes -- the high 16 bits, then the low 16 bits inside
    the bucket that holds the k-th largest -- find it in fixed memory."""
    # numpy counts: torch.bincount is ~100x slower with more than one intra-op thread (measured)
    high = np.zeros((len(which), HIGH_BINS), dtype=np.int64)
    for block in magnitudes():
        for j, i in enumerate(which):
            high[j] += np.bincount(_bits(block[i]) >> 16, minlength=HIGH_BINS)
    buckets = [_kth_largest_bin(high[j], ks[j]) for j in range(len(which))]
    low = np.zeros((len(which), LOW_BINS), dtype=np.int64)
    for block in magnitudes():
        for j, i in enumerate(which):
            bits = _bits(block[i])
            low[j] += np.bincount(bits[(bits >> 16) == buckets[j][0]] & 0xFFFF, minlength=LOW_BINS)
    cuts = []
    for j in range(len(which)):
        bucket, above_bucket = buckets[j]
        low_bin, above_low = _kth_largest_bin(low[j], ks[j] - above_bucket)
        threshold = float(np.array([(bucket << 16) | low_bin], dtype=np.int32).view(np.float32)[0])
        ties = ks[j] - above_bucket - above_low
        cuts.append(MagnitudeCut(threshold, ties, all_ties=ties == int(low[j, low_bin])))
    return cuts


def _bits(magnitude: torch.Tensor) -> np.ndarray:
    return magnitude.reshape(-1).numpy().view(np.int32)


def _kth_largest_bin(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry and how many entries lie in higher bins."""
    from_top = np.cumsum(counts[::-1])  # from_top[j]: entries in the top j + 1 bins
    j = int(np.searchsorted(from_top, k))  # the first j with from_top[j] >= k
    index = counts.size - 1 - j
    return index, int(from_top[j]) - int(counts[index])


def magnitude_sample(src: RowBlocks, values: Callable | None = None) -> list[np.ndarray] | None:
    """Per other model, float32 |delta| of about SAMPLE_ENTRIES entries from runs of rows spread evenly over
    the tensor; None for a tensor served as one block (its cut is selected from all of it). ``values``,
    when given, maps a block's MergeInputs to the float32 arrays to sample instead (one per cut)."""
    rows = src.shape[0]
    if src.rows_per_block >= rows:
        return None
    per_row = max(1, src.numel // rows)
    run = min(rows, max(1, -(-SAMPLE_ENTRIES // (per_row * SAMPLE_CHUNKS))))
    starts = sorted({int(j * (rows - run) / max(1, SAMPLE_CHUNKS - 1)) for j in range(SAMPLE_CHUNKS)})
    parts: list[list[np.ndarray]] = []
    for start in starts:
        inputs = src.inputs(start, min(rows, start + run))
        parts.append(values(inputs) if values is not None else
                     [(o - inputs.base).abs_().float().reshape(-1).numpy() for o in inputs.others])
    return [np.concatenate(per_model) for per_model in zip(*parts)]


SPARSIFIERS = {None: (), "magnitude": ("density",), "random": ("density",), "outliers": ("density", "gamma"),
               "della": ("density", "epsilon")}


@dataclass(frozen=True)
class TaskVectorMethod:
    """A row of the family: how each delta is sparsified, whether a sign is elected, whether ``normalize``
    is a parameter (otherwise the mix is never divided). ``accepts`` is what the code reads: weight,
    lambda, the sparsifier's parameters, rescale where something is dropped."""

    sparsify: str | None
    consensus: bool
    normalize: bool = True

    @property
    def accepts(self) -> frozenset[str]:
        names = {"weight", "lambda", *SPARSIFIERS[self.sparsify]}
        if self.normalize:
            names.add("normalize")
        if self.sparsify:
            names.add("rescale")
        return frozenset(names)

    def merge_blocks(self, src: RowBlocks) -> Iterator[MergeOutput]:
        if self.sparsify == "della" and len(src.shape) == 1 and src.rows_per_block < src.shape[0]:
            # a vector is one row to rank (as in mergekit): one block (vectors are small)
            src = replace(src, rows_per_block=src.shape[0])
        p = src.params
        return combine_blocks(src, self.sparsify, self.consensus, normalize=self.normalize and p.normalize,
                              rescale_l1=bool(self.sparsify) and p.rescale)


Mask = Callable[[torch.Tensor], "torch.Tensor | None"]  # a block's delta -> its 0/1 keep mask (None: keep all)


class _Sparsifier:
    """The keep masks of one sparsification of every model's delta. ``masks()`` gives fresh ones for a
    pass over the blocks in row order: magnitude cuts count the ties they keep, and random draws replay
    the same stream from the tensor's seed, so every pass keeps the same entries."""

    def __init__(self, src: RowBlocks, kind: str | None, inputs: Inputs):
        self.src, self.kind = src, kind
        p, numel = src.params, src.numel
        self.cuts: list[MagnitudeCut | None] = []  # magnitude: the fused kernels apply these directly
        self.outlier_cuts: list[MagnitudeCut | None] = []  # outliers: the top cut to drop
        if kind in ("magnitude", "outliers"):
            sample = magnitude_sample(src)
            if kind == "magnitude":
                self.cuts = magnitude_cuts(inputs, numel, list(p.densities), sample)
            else:
                keep, drop = [], []
                for density, gamma in zip(p.densities, p.gammas):
                    if density >= 1:  # nothing dropped, outliers included (as mergekit)
                        keep.append(None)
                        drop.append(None)
                        continue
                    target = int(density * numel)
                    top = min(int(gamma * numel), numel - target)  # fewer outliers when the density needs them
                    keep.append(top + target)
                    drop.append(top or None)
                self.cuts = top_k_cuts(inputs, numel, keep, sample)
                self.outlier_cuts = (top_k_cuts(inputs, numel, drop, sample) if any(drop)
                                     else [None] * len(drop))

    def masks(self) -> list[Mask]:
        count = len(self.src.params.weights)
        if self.kind == "magnitude":
            return [_cut_mask(c) for c in self.cuts]
        if self.kind == "outliers":
            return [_band_mask(keep, drop) for keep, drop in zip(self.cuts, self.outlier_cuts)]
        if self.kind == "random":
            return _random_draws(self.src, count)
        if self.kind == "della":
            return _della_draws(self.src, count)
        return [lambda d: None] * count


def _cut_mask(cut: MagnitudeCut | None) -> Mask:
    cut = None if cut is None else replace(cut)  # a copy: the cut counts the ties it keeps
    return lambda d: None if cut is None else cut.keep(d.abs().float(), d.dtype)


def _band_mask(keep: MagnitudeCut | None, drop: MagnitudeCut | None) -> Mask:
    """The k largest minus the outliers: the outliers are the largest of those k, so the difference of the
    two 0/1 masks is 0/1."""
    keep_mask, drop_mask = _cut_mask(keep), _cut_mask(drop)

    def mask(d: torch.Tensor) -> torch.Tensor | None:
        kept = keep_mask(d)
        dropped = drop_mask(d)
        if dropped is None:
            return kept
        return (torch.ones_like(dropped) if kept is None else kept).sub_(dropped)

    return mask


def combine_blocks(src: RowBlocks, sparsify: str | None, consensus: bool, normalize: bool,
                   rescale_l1: bool = False) -> Iterator[MergeOutput]:
    """base + lambda * mix(sparsified weighted deltas), block by block; ``sparsify`` is a key of
    SPARSIFIERS."""
    p = src.params
    if not p.weights:  # no other model: the base as it is
        for inputs in src.blocks():
            assert inputs.base is not None
            yield MergeOutput(inputs.base.clone(), [], 0)
        return
    count = len(p.weights)

    def deltas() -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        for inputs in src.blocks():
            assert inputs.base is not None
            yield inputs.base, [other - inputs.base for other in inputs.others]

    def inputs() -> Iterator[tuple]:
        for start, end in src.ranges():
            arrays = kernels.block_arrays(src, start, end)
            if arrays is None:
                block = src.inputs(start, end)
                arrays = block.base, block.others
            assert arrays[0] is not None
            yield arrays

    sparsifier = _Sparsifier(src, sparsify, inputs)
    scales = list(p.weights)
    if sparsify and rescale_l1:  # a first pass over the same masks: L1 norms before and after
        # (summed in float64, so the result does not depend on how the tensor is blocked)
        norms = torch.zeros(count, 2, dtype=torch.float64)
        masks = sparsifier.masks()
        for _, ds in deltas():
            for k, d in enumerate(ds):
                keep = masks[k](d)
                norms[k, 0] += float(d.abs().sum(dtype=torch.float64))
                if keep is not None:
                    norms[k, 1] += float(d.mul_(keep).abs().sum(dtype=torch.float64))
                else:
                    norms[k, 1] = norms[k, 0]
        for k in range(count):
            before, after = float(norms[k, 0]), float(norms[k, 1])
            if before >= RESCALE_EPS and after >= RESCALE_EPS:
                scales[k] *= before / after
    masks = sparsifier.masks()
    fused_cuts = sparsify == "magnitude"  # the kernels apply magnitude cuts themselves

    def keep_mask(k: int, d: torch.Tensor) -> torch.Tensor | None:
        return masks[k](d)

    for (start, end), (base, others) in zip(src.ranges(), inputs()):
        if isinstance(base, np.ndarray):  # the fused kernels
            shape = (end - start, *src.shape[1:])
            if sparsify and not fused_cuts:  # masks in torch (random draws: the same stream as the torch code's)
                weighted = [kernels.flat(_weighted(torch.from_numpy(_fused_weighted_delta(base, other, 1.0, None))
                                                   .reshape(shape), keep_mask, k, scales[k]))
                            for k, other in enumerate(others)]
            else:
                weighted = [_fused_weighted_delta(base, other, scales[k], sparsifier.cuts[k] if fused_cuts else None)
                            for k, other in enumerate(others)]
            yield _fused_mix(base, kernels.output(shape, src.out_dtype), weighted, p, consensus, normalize,
                             counts_taken=sparsify is not None)
        else:
            weighted = [_weighted(other - base, keep_mask, k, scales[k]) for k, other in enumerate(others)]
            yield _mix(base, weighted, p, consensus, normalize, counts_taken=sparsify is not None)


def _weighted(d: torch.Tensor, keep_mask, k: int, scale: float) -> torch.Tensor:
    """Delta ``d`` of model k times its keep mask and its scale, in place."""
    keep = keep_mask(k, d)
    if keep is not None:
        d.mul_(keep)
    return d.mul_(scale) if scale != 1 else d


def _fused_weighted_delta(base: np.ndarray, other: np.ndarray, scale: float, cut: MagnitudeCut | None) -> np.ndarray:
    """``_weighted`` of other - base with a magnitude cut (or none), in one kernel pass."""
    out = np.empty(base.size, np.float32)
    if cut is None:
        kernels.weighted_delta(base, other, kernels.f32(scale), kernels.f32(-np.inf), True, 0, out)
    else:
        cut.ties = kernels.weighted_delta(base, other, kernels.f32(scale), kernels.f32(cut.threshold),
                                          cut.all_ties, cut.ties, out)
    return out


def _fused_mix(base: np.ndarray, output: tuple[torch.Tensor, np.ndarray], weighted: list[np.ndarray], p,
               consensus: bool, normalize: bool, counts_taken: bool) -> MergeOutput:
    """``_mix`` in one kernel, into ``output`` (kernels.output)."""
    result, out = output
    taken = np.zeros(len(weighted), np.int64)
    lam = kernels.f32(p.lambda_)
    if consensus:
        kernels.consensus_mix(base, tuple(weighted), np.asarray(p.weights, np.float32), normalize, lam, out, taken)
    else:
        total = float(sum(p.weights))
        kernels.sum_mix(base, tuple(weighted), kernels.f32(total), normalize and abs(total) >= 1e-8, lam,
                        counts_taken, out, taken)
    counted = consensus or counts_taken
    return MergeOutput(result, [int(t) for t in taken] if counted else None)


def _random_draws(src: RowBlocks, count: int) -> list[Callable[[torch.Tensor], torch.Tensor | None]]:
    """Per model, a Bernoulli(density) draw from its own generator, seeded from the tensor's seed plus the
    model's position: block after block, the draws are those of one ``rand(shape)`` per model."""
    seed = src.generator.initial_seed()
    draws = []
    for k in range(count):
        density = src.params.densities[k]
        generator = torch.Generator().manual_seed((seed + k) % (1 << 63))
        draws.append(lambda d, g=generator, density=density:
                     None if density >= 1 else
                     _mask(torch.lt, torch.rand(d.shape, generator=g, dtype=torch.float32), density, d.dtype))
    return draws


def _della_draws(src: RowBlocks, count: int) -> list[Mask]:
    """Per model, DELLA's draw: entry j of a row of n is kept with probability density - epsilon +
    2 * epsilon * rank_j / (n - 1), rank_j the rank of |delta_j| in its row (0 the smallest; rows run along
    dimension 1, a vector is one row), from the model's own generator as in ``_random_draws``."""
    seed = src.generator.initial_seed()
    draws = []
    for k in range(count):
        density, epsilon = src.params.densities[k], src.params.epsilons[k]
        generator = torch.Generator().manual_seed((seed + k) % (1 << 63))

        def draw(d: torch.Tensor, g=generator, density=density, epsilon=epsilon) -> torch.Tensor | None:
            if density >= 1:
                return None
            rows = d.reshape(1, -1) if d.dim() < 2 else d
            n = rows.shape[1]
            rank = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
            probability = rank.mul_(2 * epsilon / (n - 1) if n > 1 else 0.0).add_(density - epsilon)
            return _mask(torch.lt, torch.rand(d.shape, generator=g, dtype=torch.float32),
                         probability.reshape(d.shape), d.dtype)

        draws.append(draw)
    return draws


def _mix(base: torch.Tensor, weighted: list[torch.Tensor], p, consensus: bool, normalize: bool,
         counts_taken: bool) -> MergeOutput:
    taken: list[int] | None = None
    if consensus:
        # the elected sign per entry, +1 or -1 (ties go to +); a delta agrees when delta * sign > 0, so
        # zeros (dropped entries) never do
        sign = _mask(torch.ge, _sum(weighted), 0, base.dtype).mul_(2).sub_(1)
        mixed = divisor = None
        taken = []
        agree = torch.empty_like(base)
        for w, wd in zip(p.weights, weighted):
            torch.gt(torch.mul(wd, sign, out=agree), 0, out=agree)  # one buffer, reused by every model
            if mixed is None:  # the first model starts the sums (no zero-filled accumulators)
                mixed = wd * agree
                divisor = agree * w if normalize else None
            else:
                mixed.addcmul_(wd, agree)
                if divisor is not None:
                    divisor.add_(agree, alpha=w)
            taken.append(_count_ones(agree))
        if divisor is not None:
            if min(p.weights) > 0:  # nonzero sums are >= the smallest weight; where nothing agreed, 0 / w = 0
                mixed.div_(divisor.clamp_(min=min(p.weights)))
            else:
                mixed.div_(divisor.add_(_mask(torch.eq, divisor, 0, base.dtype)))  # nothing agreed: divide by 1
    else:
        mixed = _sum(weighted)
        if counts_taken:  # (count_nonzero on floats is ~30x slower than a float mask and a sum, measured)
            taken = [_count_ones(_mask(torch.ne, wd, 0, base.dtype)) for wd in weighted]
        total = float(sum(p.weights))
        if normalize and abs(total) >= 1e-8:
            mixed.div_(total)
    if p.lambda_ != 1:
        mixed.mul_(p.lambda_)
    return MergeOutput(mixed.add_(base), taken)


def _count_ones(mask: torch.Tensor) -> int:
    """How many entries of a 0/1 float mask are 1. A float32 sum counts exactly up to 2**24 and is ~5x
    faster than a float64 one (measured); blocks are far smaller than that."""
    if mask.numel() < 1 << 24:
        return int(mask.sum(dtype=torch.float32))
    return int(mask.sum(dtype=torch.float64))


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    return out
