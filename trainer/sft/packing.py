"""Packing tokenised samples into fixed-capacity rows, and rows into micro batches.

- ``none``: one sample per row; a micro batch is padded to its longest row.
- ``greedy``: the samples are concatenated into one stream cut every ``max_len`` tokens (plain packing:
  attention crosses sample boundaries, a sample may be split between rows).
- ``neat``: whole samples are bin-packed (best-fit decreasing) into rows of ``max_len``; position ids
  restart at 0 for each sample and no token attends across a sample boundary.

Targets are shifted per piece (``target[t] = label[t + 1]`` inside one piece, -100 at its end), so no
token is ever trained to predict the first token of another sample.

Block-diagonal attention comes from the position ids alone (no mask is passed for neat rows): the stage runs
``attention.py``'s per-sample SDPA (flash-attention varlen on GPU reads the same position ids), and with
plain sdpa/eager attention transformers' ``find_packed_sequence_indices`` builds the equivalent
block-diagonal causal mask. Padding at a row's end is its own block, so it never touches real tokens. The model
must run with ``use_cache=False``: with a KV cache transformers skips the packed-sequence detection (the
equivalence test in tests/trainer/sft/test_sft_packing.py checks all three attention paths).
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

IGNORE = -100
Piece = tuple[int, int, int]  # (sample index, start, end)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


def pack(lengths: list[int], order: list[int], mode: str, max_len: int) -> list[list[Piece]]:
    """Rows of pieces for samples visited in ``order``."""
    if mode == "none":
        return [[(i, 0, lengths[i])] for i in order]
    if mode == "greedy":
        rows, row, room = [], [], max_len
        for i in order:
            start = 0
            while start < lengths[i]:
                take = min(room, lengths[i] - start)
                row.append((i, start, start + take))
                start += take
                room -= take
                if room == 0:
                    rows.append(row)
                    row, room = [], max_len
        if row:
            rows.append(row)
        return rows
    if mode == "neat":
        return _best_fit_decreasing(lengths, order, max_len)
    raise ValueError(f"unknown packing {mode!r}")


def _best_fit_decreasing(lengths: list[int], order: list[int], max_len: int) -> list[list[Piece]]:
    # stable sort keeps the shuffled order among equal lengths; rooms is kept sorted for a bisect best fit
    rows: list[list[Piece]] = []
    rooms: list[tuple[int, int]] = []  # (remaining capacity, row index), sorted
    for i in sorted(order, key=lambda j: -lengths[j]):
        n = lengths[i]
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, r = rooms.pop(k)
        else:
            room, r = max_len, len(rows)
            rows.append([])
        rows[r].append((i, 0, n))
        if room - n > 0:
            bisect.insort(rooms, (room - n, r))
    return rows


def epoch_rows(lengths: list[int], mode: str, max_len: int, seed: int, epoch: int) -> list[list[Piece]]:
    """The rows of one epoch: a seeded shuffle of the samples, packed, then the rows shuffled."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows = pack(lengths, order, mode, max_len)
    if mode == "neat":  # bin packing sorts by length: shuffle rows so long rows are not all first
        rng.shuffle(rows)
    return rows


def collate(rows: list[list[Piece]], samples: list[Sample], mode: str, pad_id: int) -> dict[str, torch.Tensor]:
    """A micro batch: input_ids, targets (already shifted), position_ids, and attention_mask for ``none``."""
    width = max(sum(e - s for _, s, e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        at = 0
        for i, s, e in row:
            n = e - s
            sample = samples[i]
            ids[b, at:at + n] = torch.tensor(sample.input_ids[s:e])
            shifted = sample.labels[s + 1:e] + [IGNORE]
            targets[b, at:at + n] = torch.tensor(shifted)
            positions[b, at:at + n] = torch.arange(n) if mode == "neat" else torch.arange(at, at + n)
            real[b, at:at + n] = True
            at += n
        if at < width:  # padding: its own block (neat) or masked (none/greedy)
            positions[b, at:] = torch.arange(width - at) if mode == "neat" else torch.arange(at, width)
    batch = {"input_ids": ids, "targets": targets, "position_ids": positions, "real": real}
    if mode != "neat" and not bool(real.all()):
        batch["attention_mask"] = real.long()
    return batch


def utilisation(rows: list[list[Piece]], micro: int) -> tuple[int, int]:
    """(real tokens, computed tokens) when rows are batched ``micro`` at a time, padded to the longest."""
    real = computed = 0
    for k in range(0, len(rows), micro):
        sizes = [sum(e - s for _, s, e in row) for row in rows[k:k + micro]]
        real += sum(sizes)
        computed += max(sizes) * len(sizes)
    return real, computed
