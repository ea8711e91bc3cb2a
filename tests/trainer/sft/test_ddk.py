"""DDK domain mixing (Liu et al., 2024): the factor smooth update by hand, the rows dealt by weight, the split."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from branchmerge.trainer.errors import InvalidInput
from branchmerge.trainer.sft.ddk import DomainSampler, Domains, smooth_update, split_domains
from branchmerge.trainer.sft.packing import Sample
from branchmerge.trainer.sft.schedule import make_schedule


def test_factor_smooth_update_by_hand():
    # psi = w * exp(l_S / l_T) = [0.5 e^2, 0.5 e^1]; normalised e / (e + 1) and 1 / (e + 1); alpha 0.5 toward 1/2
    e = math.e
    got = smooth_update([0.5, 0.5], [2.0, 1.0], [1.0, 1.0], 0.5)
    assert got == pytest.approx([0.5 * e / (e + 1) + 0.25, 0.5 / (e + 1) + 0.25])
    assert got[0] == pytest.approx(0.6155293, abs=1e-7) and sum(got) == pytest.approx(1.0)
    # three domains, uneven start, teacher losses differ: ratios 3/1.5 = 2, 2/2 = 1, 1/0.5 = 2
    w = [0.2, 0.3, 0.5]
    psi = [0.2 * e ** 2, 0.3 * e, 0.5 * e ** 2]
    ref = [0.8 * x / sum(psi) + 0.2 / 3 for x in psi]
    assert smooth_update(w, [3.0, 2.0, 1.0], [1.5, 2.0, 0.5], 0.8) == pytest.approx(ref)
    # smoothing 0: uniform; equal ratios: the weights only move toward uniform
    assert smooth_update(w, [1, 1, 1], [1, 1, 1], 0.0) == pytest.approx([1 / 3] * 3)
    assert smooth_update(w, [1, 1, 1], [1, 1, 1], 0.5) == pytest.approx([0.5 * x + 0.5 / 3 for x in w])
    # no overflow for a huge gap
    big = smooth_update([0.5, 0.5], [2000.0, 1.0], [1.0, 1.0], 0.5)
    assert big == pytest.approx([0.75, 0.25])


def _sampler(weights, global_batch=4, sizes=(10, 10)):
    training = SimpleNamespace(global_batch_size=global_batch, micro_batch_size=1, epochs=5.0, packing="none",
                               max_seq_len=64, seed=3, max_steps=None)
    start, train = 0, []
    for n in sizes:
        train.append(list(range(start, start + n)))
        start += n
    lengths = [5] * start
    domains = Domains(["a", "b"][:len(sizes)], train, [[] for _ in sizes])
    schedule = make_schedule(lengths, training, 1)
    return DomainSampler(schedule, domains, lengths, "none", 64, 3, list(weights)), train


def _counts(rows, train):
    return [sum(1 for row in rows if row[0][0] in members) for members in train]


def test_rows_follow_the_weights():
    sampler, train = _sampler([0.75, 0.25])
    for step in range(6):
        assert _counts(sampler.step_rows(step), train) == [3, 1]
    sampler.weights = [0.6, 0.4]  # 2.4 / 1.6 rows per step: the deficit deals 3/1 and 2/2 in turn
    counts = [_counts(sampler.step_rows(step), train) for step in range(6, 11)]
    assert sum(c[0] for c in counts) == 12 and sum(c[1] for c in counts) == 8
    assert all(c[0] in (2, 3) for c in counts)
    # 11 steps x 4 rows of one 5-token sample each, micro batches of 1: rows 5/64 full, no padding
    assert sampler.utilisation(64) == pytest.approx((5 / 64, 1.0))


def test_each_domain_cycles_through_its_rows_and_resumes():
    sampler, train = _sampler([0.5, 0.5], global_batch=4)
    seen = [row[0][0] for step in range(5) for row in sampler.step_rows(step) if row[0][0] in train[0]]
    assert sorted(seen) == train[0]  # one pass over domain a: every sample once
    state = sampler.state()
    again, _ = _sampler([0.5, 0.5], global_batch=4)
    again.restore(state)
    assert again.step_rows(5) == sampler.step_rows(5)


def test_split_holds_out_validation_samples_and_their_duplicates():
    samples = [Sample([i, i + 1], [-100, i]) for i in range(6)] + [Sample([100 + i], [1]) for i in range(4)]
    samples.append(Sample([0, 1], [-100, 0]))  # a repeat of the first sample in the first dataset's range
    spec = SimpleNamespace(data=[SimpleNamespace(domain="math", weight=1.0), SimpleNamespace(domain=None,
                                                                                              weight=1.0)],
                           objective=SimpleNamespace(ddk=SimpleNamespace(validation_samples=2)),
                           training=SimpleNamespace(seed=1))
    samples = samples[:6] + [samples[10]] + samples[6:10]  # dataset 0: 7 samples (one repeat), dataset 1: 4
    domains = split_domains(spec, samples, [7, 4])
    assert domains.names == ["math", "data1"]
    assert [len(v) for v in domains.validation] == [2, 2]
    for train, val in zip(domains.train, domains.validation):
        ids = {tuple(samples[j].input_ids) for j in val}
        assert not set(train) & set(val) and all(tuple(samples[j].input_ids) not in ids for j in train)
    assert all(j < 7 for j in domains.train[0] + domains.validation[0])
    spec.objective.ddk.validation_samples = 4
    with pytest.raises(InvalidInput, match=r"validationSamples=4: spec.data\[1\] \(data1\) has only 4"):
        split_domains(spec, samples, [7, 4])


def test_split_keeps_a_given_validation_set_apart():
    samples = [Sample([i, i + 1], [-100, i]) for i in range(8)]  # 5 + 3 mixed, then 2 validation samples
    spec = SimpleNamespace(data=[SimpleNamespace(domain="a", weight=1.0), SimpleNamespace(domain="b", weight=1.0)],
                           objective=SimpleNamespace(ddk=SimpleNamespace(validation_samples=2)),
                           training=SimpleNamespace(seed=1))
    domains = split_domains(spec, samples + [Sample([50], [1]), Sample([51], [1])], [5, 3], {1: [8, 9]})
    assert domains.validation[1] == [8, 9] and domains.train[1] == [5, 6, 7]  # b trains on all of its data
    assert len(domains.validation[0]) == 2 and len(domains.train[0]) == 3
