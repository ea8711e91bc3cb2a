"""Fused CPU kernels (numba) for the merge methods' hot loops.

A method written as torch operations makes a dozen elementwise passes over each block, each reading and
writing its operands again; compiled into one loop per step, the same arithmetic runs 5-10x faster (measured
in bench/merge.py). The kernels perform exactly the operations of the torch code they replace, in the same
order and in float32, and are compiled without fast-math (no fused multiply-add, no reciprocal division, no
reassociation), so their results are bit-identical to it: tests/trainer/merge/test_kernels.py checks that
against the torch code. They apply when the computation is in float32 (the default) and the inputs are
stored in float32 or bfloat16; other dtypes keep the torch code.

``nogil``: the engine's workers run kernels of different tensors at the same time. ``cache``: compiled code is
kept next to this file, or in ``NUMBA_CACHE_DIR`` (the images set one) or numba's user cache folder when that
is read-only, so only the first process compiles (TIES: ~7 s on 2 busy cores, Arcee Fusion ~1 s); later ones
pay ~0.5 s to import numba and load the code.
"""
from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

JIT = dict(nogil=True, cache=True, error_model="numpy")


# Inputs are read as stored: bfloat16 files are not cast to a float32 copy first (that pass cost a quarter of
# a TIES merge); ``value`` widens each entry where it is used, exactly as torch's cast does (the 16 bits
# become the high half of a float32).
def value(x):
    """An input entry as float32 (bfloat16 bits held in a uint16, or a float32)."""
    raise NotImplementedError("only inside numba-compiled code")


@intrinsic
def _bfloat16_bits_to_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())
    return types.float32(bits), codegen


@overload(value)
def _value(x):
    if x == types.uint16:
        return lambda x: _bfloat16_bits_to_float32(x)
    if x == types.float32:
        return lambda x: x
    return None


# Outputs are written as the engine stores them: a bfloat16 result is rounded here, not in another pass.
def store(out, i, x):
    """out[i] = float32 ``x`` (bfloat16 bits in a uint16: rounded to nearest even as torch's cast does)."""
    raise NotImplementedError("only inside numba-compiled code")


@intrinsic
def _float32_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(x), codegen


@overload(store)
def _store(out, i, x):
    if out.dtype == types.uint16:
        def impl(out, i, x):
            if x != x:  # NaN: what torch's vectorized cast writes
                out[i] = np.uint16(0xFFFF)
            else:
                bits = np.uint32(_float32_bits(x))
                out[i] = np.uint16((bits + ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))
                                   >> np.uint32(16))
        return impl
    if out.dtype == types.float32:
        def impl(out, i, x):
            out[i] = x
        return impl
    return None


@njit(**JIT)
def magnitude_band(base, other, lo, hi, band):
    """Of |other - base|: how many lie above ``hi``, and those in [lo, hi] copied into ``band`` (in order);
    returns (above, how many were copied). ``band`` needs room for one more entry than it gets."""
    above = 0
    count = 0
    for i in range(base.size):
        m = abs(value(other[i]) - value(base[i]))
        above += m > hi
        band[count] = m  # written always, kept by moving on: no branch to mispredict
        count += (m >= lo) & (m <= hi)
    return above, count


@njit(**JIT)
def weighted_delta(base, other, weight, threshold, inclusive, ties_left, out):
    """out = (other - base) * keep * weight, keep = 1 where |other - base| > threshold (>= when ``inclusive``),
    plus the first ``ties_left`` entries equal to it; returns the ties still to keep. threshold = -inf with
    ``inclusive`` keeps everything."""
    end, ties_left = _ties_end(base, other, threshold, ties_left)
    _cut_delta(base[:end], other[:end], weight, threshold, True, out[:end])  # up to the last tie kept
    _cut_delta(base[end:], other[end:], weight, threshold, inclusive, out[end:])
    return ties_left


TIE_CHUNK = 4096


@njit(**JIT)
def _ties_end(base, other, threshold, ties_left):
    """(the position just after the last of the first ``ties_left`` entries whose |other - base| equals the
    threshold, how many are still missing at the end). Counted a chunk at a time so the count vectorizes:
    with bfloat16 inputs a third of a tensor can lie before the last tie kept."""
    start = 0
    n = base.size
    while ties_left > 0 and start < n:
        end = min(n, start + TIE_CHUNK)
        equal = _count_equal(base[start:end], other[start:end], threshold)
        if equal < ties_left:
            ties_left -= equal
            start = end
            continue
        for i in range(start, end):  # the last tie kept is in this chunk
            if abs(value(other[i]) - value(base[i])) == threshold:
                ties_left -= 1
                if ties_left == 0:
                    return i + 1, 0
    return start, ties_left


@njit(**JIT)
def _count_equal(base, other, threshold):
    count = 0
    for i in range(base.size):
        count += abs(value(other[i]) - value(base[i])) == threshold
    return count


@njit(**JIT)
def _cut_delta(base, other, weight, threshold, inclusive, out):
    one = np.float32(1)
    zero = np.float32(0)
    if inclusive:
        for i in range(base.size):
            d = value(other[i]) - value(base[i])
            out[i] = d * (one if abs(d) >= threshold else zero) * weight
    else:
        for i in range(base.size):
            d = value(other[i]) - value(base[i])
            out[i] = d * (one if abs(d) > threshold else zero) * weight


@njit(**JIT)
def consensus_mix(base, deltas, weights, normalize, lam, out, taken):
    """TIES's mix of weighted deltas (a tuple of arrays): the elected sign is that of their sum (0 counts as
    +); each delta whose product with it is > 0 is kept; kept deltas are summed and, with ``normalize``,
    divided by the summed weights of the kept ones (at least the smallest weight when all weights are
    positive; else 1 where nothing was kept); times ``lam``, plus base. ``taken[k]``: entries kept of delta k."""
    n = base.size
    one = np.float32(1)
    zero = np.float32(0)
    last = len(deltas) - 1
    sign = np.empty(n, np.float32)
    _copy(deltas[0], sign)
    for k in range(1, last + 1):
        _add(sign, deltas[k], sign)
    for i in range(n):
        sign[i] = one if sign[i] >= zero else -one
    mixed = np.empty(n, np.float32)
    divisor = np.empty(n, np.float32)
    for k in range(last + 1):
        taken[k] += _agree(deltas[k], sign, weights[k], k == 0, mixed, divisor)
    if normalize:
        smallest = weights.min()
        if smallest > zero:
            for i in range(n):
                store(out, i, mixed[i] / max(divisor[i], smallest) * lam + value(base[i]))
        else:
            for i in range(n):
                store(out, i, mixed[i] / (divisor[i] + (one if divisor[i] == zero else zero)) * lam
                      + value(base[i]))
    else:
        for i in range(n):
            store(out, i, mixed[i] * lam + value(base[i]))


@njit(**JIT)
def _agree(delta, sign, weight, first, mixed, divisor):
    """Adds the entries of ``delta`` that agree with ``sign`` to ``mixed`` and their weight to ``divisor``
    (``first``: they start the sums); returns how many agreed."""
    one = np.float32(1)
    zero = np.float32(0)
    count = 0
    if first:
        for i in range(delta.size):
            agree = one if delta[i] * sign[i] > zero else zero
            mixed[i] = delta[i] * agree
            divisor[i] = agree * weight
            count += agree > zero
    else:
        for i in range(delta.size):
            agree = one if delta[i] * sign[i] > zero else zero
            mixed[i] = mixed[i] + delta[i] * agree
            divisor[i] = divisor[i] + agree * weight
            count += agree > zero
    return count


@njit(**JIT)
def sum_mix(base, deltas, total, normalize, lam, count_taken, out, taken):
    """Task arithmetic's mix: the sum of the weighted deltas, divided by ``total`` with ``normalize``, times
    ``lam``, plus base. With ``count_taken``, ``taken[k]`` counts the nonzero entries of delta k."""
    n = base.size
    zero = np.float32(0)
    mixed = np.empty(n, np.float32)
    _copy(deltas[0], mixed)
    for k in range(1, len(deltas)):
        _add(mixed, deltas[k], mixed)
    if count_taken:
        for k in range(len(deltas)):
            d = deltas[k]
            count = 0
            for i in range(n):
                count += d[i] != zero
            taken[k] += count
    if normalize:
        for i in range(n):
            store(out, i, mixed[i] / total * lam + value(base[i]))
    else:
        for i in range(n):
            store(out, i, mixed[i] * lam + value(base[i]))


@njit(**JIT)
def _copy(a, out):
    for i in range(a.size):
        out[i] = a[i]


@njit(**JIT)
def _add(a, b, out):
    for i in range(a.size):
        out[i] = a[i] + b[i]


@njit(**JIT)
def fusion_select(base, other, row_kl, width, cut, out):
    """Arcee Fusion's choice: out = other where |other - base| * (its row's KL) >= cut, else base (flat
    arrays of rows of ``width``); returns how many entries came from other."""
    taken = 0
    for r in range(base.size // width):
        row = slice(r * width, (r + 1) * width)
        taken += _select_row(base[row], other[row], row_kl[r], cut, out[row])
    return taken


@njit(**JIT)
def _select_row(base, other, kl, cut, out):
    taken = 0
    for i in range(base.size):
        o = value(other[i])
        b = value(base[i])
        take = abs(o - b) * kl >= cut
        store(out, i, o if take else b)
        taken += take
    return taken


@njit(**JIT)
def fusion_scores_at(base, other, row_kl, width, positions, out):
    """Arcee Fusion's scores at some flat ``positions``: |other - base| * (the row's KL)."""
    for j in range(positions.size):
        at = positions[j]
        out[j] = abs(value(other[at]) - value(base[at])) * row_kl[at // width]


@njit(**JIT)
def abs_delta(base, other, out):
    for i in range(base.size):
        out[i] = abs(value(other[i]) - value(base[i]))


@njit(**JIT)
def kl_terms(p, q, eps):
    """The KL's terms before the log, in place: p <- p + eps, q <- (p + eps) / (q + eps)."""
    for i in range(p.size):
        a = p[i] + eps
        q[i] = a / (q[i] + eps)
        p[i] = a


@njit(**JIT)
def stratified_positions(draws, numel, out):
    """Position j = floor((j + draws[j]) * numel / draws.size) in float64, at most numel - 1: one uniform
    draw inside each of draws.size equal runs of a tensor of ``numel`` entries (ascending)."""
    scale = numel / draws.size
    for j in range(draws.size):
        out[j] = min(np.int64((np.float64(j) + np.float64(draws[j])) * scale), numel - 1)


def readable(tensor: torch.Tensor | None) -> np.ndarray | None:
    """The tensor's entries as the kernels read them, flat and sharing its memory: float32 as is, bfloat16
    as its bits (uint16); None for another dtype or a non-contiguous layout."""
    if tensor is None or not tensor.is_contiguous():
        return None
    if tensor.dtype == torch.float32:
        return tensor.reshape(-1).numpy()
    if tensor.dtype == torch.bfloat16:
        return tensor.reshape(-1).view(torch.int16).numpy().view(np.uint16)
    return None


def block_arrays(src, start: int, end: int) -> tuple[np.ndarray | None, list[np.ndarray]] | None:
    """Rows ``start:end`` of a ``RowBlocks`` as the kernels read them (anchor or None, [others]); None when
    the kernels do not apply (computation not in float32, or an input stored in another dtype)."""
    stored = src.stored(start, end)
    if stored is None:
        return None
    anchor, others = stored
    arrays = [readable(t) for t in others]
    if any(a is None for a in arrays) or (anchor is not None and readable(anchor) is None):
        return None
    return readable(anchor), arrays


def output(shape: tuple[int, ...], dtype: torch.dtype | None) -> tuple[torch.Tensor, np.ndarray]:
    """A block's result tensor and the array the kernels write it through: in ``dtype`` when they can write
    it (bfloat16, float32; rounding there is what casting afterwards would do), else float32."""
    tensor = torch.empty(shape, dtype=dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32)
    return tensor, readable(tensor)


def flat(tensor: torch.Tensor) -> np.ndarray:
    """A float32 tensor's entries as a flat numpy array sharing its memory."""
    return tensor.reshape(-1).numpy()


def f32(value: float) -> np.float32:
    """A Python number as the float32 operand torch makes of it (passed as a float64, numba would compute
    in float64 and round once: not what the torch code does)."""
    return np.float32(value)
