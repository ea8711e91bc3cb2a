"""DDK domain mixing (Liu et al., 2024, "DDK: Distilling Domain Knowledge for Efficient Large Language Models").

The datasets of spec.data are the domains of the mixed-data baseline. Every ``everySteps`` optimizer steps (and
before the first) the student's and the teacher's token cross-entropy is measured on each domain's held-out
validation samples, and the sampling weights are updated by the paper's factor smooth updating:

    psi_i = w_i * exp(l_S[i] / l_T[i])            the domain discrepancy factor, applied to the current weights
    w_i  <- a * psi_i / sum_j psi_j + (1 - a) / N  smoothed toward uniform (a = ``smoothing``, paper 0.5)

so domains where the student is furthest behind the teacher (relative to the teacher's own loss) get more of
the following steps' rows. The initial weights are the static mixture's proportions (spec weights x sizes).

Rows are drawn per domain: each domain's training samples are packed into rows of their own (a seeded
shuffle per pass over the domain, as the static schedule does per epoch), and each step's ``globalBatchSize``
row slots are dealt by largest deficit (cumulative weight x slots minus rows given, per domain): a
deterministic schedule every rank computes alike, whose composition follows the weights within one row. The
step count is the static schedule's (epochs over the training samples). Weights, cursors and deficits are part of
the resumable state.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field

import torch

from ..errors import InvalidInput
from .packing import IGNORE, Piece, Sample, collate, epoch_rows


@dataclass
class Domains:
    names: list[str]
    train: list[list[int]]  # sample indices per domain
    validation: list[list[int]]


def domain_names(spec) -> list[str]:
    names = [ref.domain or f"data{i}" for i, ref in enumerate(spec.data)]
    if len(set(names)) != len(names):
        raise InvalidInput(f"spec.data[*].domain: objective.ddk needs distinct domain labels, got {names}")
    return names


def load_validation(spec, tokenizer, input_path, samples: list[Sample]) -> dict[int, list[int]]:
    """The ``spec.data[i].validation`` sets, tokenised like the training data (the training template, the
    dataset's layout; longer than maxSeqLen: truncated) and appended to ``samples``: {i: their indices}, at
    most validationSamples per domain (a seeded subset)."""
    from .chat import encode
    from .records import Layout, load_dataset

    template = spec.chat_template or tokenizer.chat_template
    k, max_len = spec.objective.ddk.validation_samples, spec.training.max_seq_len
    rng = random.Random(spec.training.seed * 7919 + 29)
    found: dict[int, list[int]] = {}
    for i, ref in enumerate(spec.data):
        if ref.validation is None:
            continue
        what = f"spec.data[{i}].validation"
        conversations = load_dataset(input_path(ref.validation, what), Layout.of(ref), what)
        if len(conversations) > k:
            conversations = [conversations[j] for j in sorted(rng.sample(range(len(conversations)), k))]
        found[i] = []
        for messages in conversations:
            enc = encode(tokenizer, messages, template)
            ids, labels = enc.input_ids[:max_len], enc.labels[:max_len]
            if all(x == IGNORE for x in labels[1:]):
                continue  # nothing to score within maxSeqLen
            found[i].append(len(samples))
            samples.append(Sample(ids, labels))
        if not found[i]:
            raise InvalidInput(f"{what}: no record has an assistant token within maxSeqLen={max_len}")
    return found


def split_domains(spec, samples, per_dataset: list[int], given: dict[int, list[int]] | None = None) -> Domains:
    """Each dataset's samples (their range in the mixed list, records.mix's order) split into held-out
    validation samples and training samples; a dataset with its own validation set (``given``: indices of
    samples appended after the mixed ones) trains on all of its samples. A duplicate of a held-out sample (a
    weight above 1 repeats samples) is not trained on."""
    names = domain_names(spec)
    given = given or {}
    k = spec.objective.ddk.validation_samples
    sizes = [max(1, round(ref.weight * n)) for ref, n in zip(spec.data, per_dataset)]  # records.mix's sizes
    if sum(sizes) + sum(len(v) for v in given.values()) != len(samples) or len(sizes) != len(spec.data):
        raise InvalidInput(f"objective.ddk: cannot tell the domains apart ({len(samples)} samples, per dataset "
                           f"{per_dataset})")
    rng = random.Random(spec.training.seed * 7919 + 17)
    train, validation, start = [], [], 0
    for i, size in enumerate(sizes):
        indices = list(range(start, start + size))
        start += size
        if i in given:
            validation.append(list(given[i]))
            train.append(indices)
            continue
        unique: dict[tuple, int] = {}
        for j in indices:
            unique.setdefault(tuple(samples[j].input_ids), j)
        if len(unique) <= k:
            raise InvalidInput(
                f"spec.objective.ddk.validationSamples={k}: spec.data[{i}] ({names[i]}) has only {len(unique)} "
                f"distinct samples; lower validationSamples or add data")
        held = sorted(rng.sample(sorted(unique.values()), k))
        held_ids = {tuple(samples[j].input_ids) for j in held}
        validation.append(held)
        train.append([j for j in indices if tuple(samples[j].input_ids) not in held_ids])
    return Domains(names, train, validation)


def smooth_update(weights: list[float], student: list[float], teacher: list[float], smoothing: float) -> list[float]:
    """DDK's factor smooth updating (module docstring), in log space so exp(l_S / l_T) cannot overflow."""
    logits = [math.log(max(w, 1e-300)) + s / max(t, 1e-12) for w, s, t in zip(weights, student, teacher)]
    top = max(logits)
    psi = [math.exp(x - top) for x in logits]
    total = sum(psi)
    n = len(weights)
    return [smoothing * x / total + (1 - smoothing) / n for x in psi]


@dataclass
class DomainSampler:
    """The rows of each step under DDK weights; stands in for schedule.Schedule in the training loop."""

    base: object  # schedule.Schedule over the training samples: step count, epochs, accumulation
    domains: Domains
    lengths: list[int]
    packing: str
    max_len: int
    seed: int
    weights: list[float]
    history: list[dict] = field(default_factory=list)
    cursors: list[list[int]] = field(default_factory=list)  # per domain: [pass, next row]
    target: list[float] = field(default_factory=list)
    given: list[int] = field(default_factory=list)
    fill: list[int] = field(default_factory=lambda: [0, 0, 0])  # real tokens, computed tokens, rows dealt
    recorded: dict[int, list[list[Piece]]] = field(default_factory=dict)
    _rows: dict[tuple[int, int], list[list[Piece]]] = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.domains.names)
        self.cursors = self.cursors or [[0, 0] for _ in range(n)]
        self.target = self.target or [0.0] * n
        self.given = self.given or [0] * n

    # the Schedule interface the loop uses
    def __getattr__(self, name):
        if name in ("total_steps", "accumulation", "steps_by_epoch", "rows_by_epoch", "world_size",
                    "micro_batch", "global_batch", "epoch_float", "locate"):
            return getattr(self.base, name)
        raise AttributeError(name)

    def _domain_rows(self, d: int, epoch: int) -> list[list[Piece]]:
        key = (d, epoch)
        if key not in self._rows:
            members = self.domains.train[d]
            local = epoch_rows([self.lengths[j] for j in members], self.packing, self.max_len,
                               self.seed * 31 + d + 1, epoch)
            self._rows[key] = [[(members[i], s, e) for i, s, e in row] for row in local]
            self._rows = {k: v for k, v in self._rows.items() if k[1] >= epoch - 1 or k[0] != d}
        return self._rows[key]

    def _next_row(self, d: int) -> list[Piece]:
        epoch, k = self.cursors[d]
        rows = self._domain_rows(d, epoch)
        if k >= len(rows):
            epoch, k = epoch + 1, 0
            rows = self._domain_rows(d, epoch)
        self.cursors[d] = [epoch, k + 1]
        return rows[k]

    def step_rows(self, step: int) -> list[list[Piece]]:
        """The rows of ``step`` (dealt on first use, in step order)."""
        if step not in self.recorded:
            slots = self.base.global_batch
            self.target = [t + w * slots for t, w in zip(self.target, self.weights)]
            rows = []
            for _ in range(slots):
                d = max(range(len(self.weights)), key=lambda i: (self.target[i] - self.given[i], -i))
                self.given[d] += 1
                rows.append(self._next_row(d))
            self.recorded = {step: rows}  # only the current step is needed again (micro_batches)
            for rank in range(self.base.world_size):
                for micro in self.micro_batches(step, rank):
                    sizes = [sum(e - s for _, s, e in row) for row in micro]
                    self.fill = [self.fill[0] + sum(sizes), self.fill[1] + max(sizes) * len(sizes),
                                 self.fill[2] + len(sizes)]
        return self.recorded[step]

    def micro_batches(self, step: int, rank: int) -> list[list[list[Piece]]]:
        if step not in self.recorded:
            return []  # a past step: not kept (the loop's utilisation metric covers the steps it can see)
        mine = self.recorded[step][rank::self.base.world_size]
        return [mine[i:i + self.base.micro_batch] for i in range(0, len(mine), self.base.micro_batch)]

    def utilisation(self, max_len: int) -> tuple[float, float]:
        """(row fill, compute fill) over the steps dealt so far (train._utilisation's measures)."""
        real, computed, rows = self.fill
        return (real / (rows * max_len) if rows else 0.0), (real / computed if computed else 0.0)

    def state(self) -> dict:
        return copy.deepcopy({"weights": self.weights, "history": self.history, "cursors": self.cursors,
                              "target": self.target, "given": self.given, "fill": self.fill})

    def restore(self, state: dict | None) -> None:
        if state:
            for key in ("weights", "history", "cursors", "target", "given", "fill"):
                if key in state:
                    setattr(self, key, copy.deepcopy(state[key]))


def initial_weights(domains: Domains) -> list[float]:
    sizes = [len(t) for t in domains.train]
    return [s / sum(sizes) for s in sizes]


@torch.no_grad()
def domain_losses(model_fn, samples, indices: list[int], micro: int, pad_id: int, chunks: int,
                  device) -> float:
    """Token-mean cross-entropy of ``model_fn`` on the samples ``indices`` (one sample per row, ``micro`` rows
    per forward). ``model_fn(inputs) -> (hidden, head)`` (chunked_loss.student_states / teacher_states)."""
    from .chunked_loss import loss_sums

    total, tokens = 0.0, 0
    for k in range(0, len(indices), micro):
        rows = [[(j, 0, len(samples[j].input_ids))] for j in indices[k:k + micro]]
        batch = {key: v.to(device) for key, v in collate(rows, samples, "none", pad_id).items()}
        inputs = {key: batch[key] for key in ("input_ids", "position_ids", "attention_mask") if key in batch}
        hidden, head = model_fn(inputs)
        ce, _ = loss_sums(hidden, head, batch["targets"], chunks=chunks)
        total += float(ce)
        tokens += int((batch["targets"] != IGNORE).sum())
    return total / max(tokens, 1)
