"""The training schedule: gradient accumulation, the step count, and which rows every rank sees at every step.

Everything here is a pure function of (samples, spec, world size), so every rank derives the same schedule
without communication and a resumed run replays exactly the data order of an uninterrupted one: the
sampler position is just the global step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidInput
from .packing import Piece, epoch_rows


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise InvalidInput(
            f"spec.training.globalBatchSize={global_batch} is not a multiple of microBatchSize x world size "
            f"= {micro_batch} x {world_size} = {per_pass}: gradient accumulation would not be integral")
    return global_batch // per_pass


@dataclass
class Schedule:
    rows_by_epoch: list[list[list[Piece]]]
    global_batch: int
    micro_batch: int
    world_size: int
    accumulation: int
    steps_by_epoch: list[int]
    total_steps: int

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within epoch) of a global step (0-based)."""
        for epoch, n in enumerate(self.steps_by_epoch):
            if step < n:
                return epoch, step
            step -= n
        raise IndexError(step)

    def step_rows(self, step: int) -> list[list[Piece]]:
        """All rows of one optimizer step (every rank), wrapping around at the end of an epoch."""
        epoch, k = self.locate(step)
        rows = self.rows_by_epoch[epoch]
        start = k * self.global_batch
        return [rows[(start + j) % len(rows)] for j in range(self.global_batch)]

    def micro_batches(self, step: int, rank: int) -> list[list[list[Piece]]]:
        """This rank's micro batches of one step: rows rank, rank + world, ... split in microBatchSize."""
        mine = self.step_rows(step)[rank::self.world_size]
        return [mine[i:i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]

    def epoch_float(self, step: int) -> float:
        """Epochs completed after ``step`` optimizer steps (fractional)."""
        done = 0.0
        for n in self.steps_by_epoch:
            if step >= n:
                done, step = done + 1, step - n
            else:
                return done + step / n
        return done


def make_schedule(lengths: list[int], training, world_size: int) -> Schedule:
    accumulation = accumulation_steps(training.global_batch_size, training.micro_batch_size, world_size)
    n_epochs = math.ceil(training.epochs)
    rows_by_epoch, steps_by_epoch = [], []
    for epoch in range(n_epochs):
        rows = epoch_rows(lengths, training.packing, training.max_seq_len, training.seed, epoch)
        steps = math.ceil(len(rows) / training.global_batch_size)
        fraction = training.epochs - epoch
        if fraction < 1:
            steps = max(1, math.ceil(steps * fraction))
        rows_by_epoch.append(rows)
        steps_by_epoch.append(steps)
    total = sum(steps_by_epoch)
    if training.max_steps is not None and training.max_steps < total:
        total = training.max_steps
        left = total
        for e, n in enumerate(steps_by_epoch):
            steps_by_epoch[e] = min(n, left)
            left -= steps_by_epoch[e]
        keep = sum(1 for n in steps_by_epoch if n > 0)
        rows_by_epoch, steps_by_epoch = rows_by_epoch[:keep], steps_by_epoch[:keep]
    return Schedule(rows_by_epoch, training.global_batch_size, training.micro_batch_size, world_size, accumulation,
                steps_by_epoch, total)
