"""Packing modes, the training schedule, and neat packing's equivalence with running samples separately."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from branchmerge.trainer.errors import InvalidInput
from branchmerge.trainer.sft.chat import encode
from branchmerge.trainer.sft.losses import token_cross_entropy
from branchmerge.trainer.sft.packing import IGNORE, Sample, collate, epoch_rows, pack, utilisation
from branchmerge.trainer.sft.schedule import accumulation_steps, make_schedule

from .sft_helpers import reasoning_records


def long_tail(n, seed=0, cap=512):
    rng = random.Random(seed)
    return [min(cap, int(rng.paretovariate(1.2) * 20)) for _ in range(n)]


def test_neat_rows_hold_whole_samples_within_capacity():
    lengths = long_tail(2000)
    rows = pack(lengths, list(range(len(lengths))), "neat", 512)
    seen = sorted(i for row in rows for i, s, e in row)
    assert seen == list(range(len(lengths)))  # every sample exactly once, never split
    assert all((s, e) == (0, lengths[i]) for row in rows for i, s, e in row)
    assert all(sum(e - s for _, s, e in row) <= 512 for row in rows)
    real, _ = utilisation(rows, 1)
    assert real / (len(rows) * 512) >= 0.98


def test_greedy_cuts_the_stream_and_none_keeps_one_sample_per_row():
    lengths = [5, 9, 3, 7]
    rows = pack(lengths, [0, 1, 2, 3], "greedy", 8)
    assert [sum(e - s for _, s, e in r) for r in rows] == [8, 8, 8]
    assert rows[0] == [(0, 0, 5), (1, 0, 3)] and rows[1] == [(1, 3, 9), (2, 0, 2)]
    assert pack(lengths, [2, 0, 1, 3], "none", 8) == [[(2, 0, 3)], [(0, 0, 5)], [(1, 0, 9)], [(3, 0, 7)]]


def test_epoch_order_is_seeded():
    lengths = long_tail(100)
    assert epoch_rows(lengths, "neat", 512, 1, 0) == epoch_rows(lengths, "neat", 512, 1, 0)
    assert epoch_rows(lengths, "neat", 512, 1, 0) != epoch_rows(lengths, "neat", 512, 1, 1)


def test_accumulation_must_be_integral():
    assert accumulation_steps(96, 2, 4) == 12
    with pytest.raises(InvalidInput, match="globalBatchSize=10 is not a multiple of microBatchSize x world size"):
        accumulation_steps(10, 1, 4)


def test_plan_splits_each_global_batch_over_ranks_and_micro_batches():
    training = SimpleNamespace(global_batch_size=8, micro_batch_size=2, epochs=1.5, max_steps=None,
                               packing="none", max_seq_len=64, seed=0)
    schedule = make_schedule([10] * 20, training, world_size=2)
    assert schedule.accumulation == 2 and schedule.steps_by_epoch == [3, 2] and schedule.total_steps == 5
    for step in range(schedule.total_steps):
        per_rank = [schedule.micro_batches(step, r) for r in range(2)]
        assert all(len(m) == 2 and all(len(b) == 2 for b in m) for m in per_rank)
        flat = sorted(row[0] for m in per_rank for b in m for row in b)
        assert flat == sorted(row[0] for row in schedule.step_rows(step))
    assert schedule.epoch_float(3) == 1.0 and schedule.epoch_float(4) == 1.5


@pytest.fixture(scope="module")
def model_and_samples(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    samples = [Sample(e.input_ids, e.labels) for e in (
        encode(tiny_tokenizer, [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}])
        for r in reasoning_records(3, seed=5))]
    return tiny_model, samples


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_neat_packed_row_gives_the_same_per_token_loss_as_separate_samples(model_and_samples, tiny_tokenizer, attn):
    from transformers import AutoModelForCausalLM

    path, samples = model_and_samples
    if attn == "varlen":  # the stage's own per-sample attention (trainer/sft/attention.py)
        from branchmerge.trainer.sft.attention import register

        attn = register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    # use_cache=False matters: with a KV cache transformers skips its packed-sequence mask (as in training)
    pad = tiny_tokenizer.pad_token_id
    n = [len(s.input_ids) for s in samples]
    # row 0 packs samples 0 and 1; row 1 holds sample 2 and is padded: both rows in one micro batch
    rows = [[(0, 0, n[0]), (1, 0, n[1])], [(2, 0, n[2])]]
    batch = collate(rows, samples, "neat", pad)
    assert "attention_mask" not in batch and batch["position_ids"][0, n[0]] == 0  # positions restart
    with torch.no_grad():
        packed = token_cross_entropy(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits,
                                     batch["targets"])
        separate = []
        for i in range(3):
            single = collate([[(i, 0, n[i])]], samples, "neat", pad)
            separate.append(token_cross_entropy(model(input_ids=single["input_ids"], use_cache=False).logits, single["targets"])[0])
        leaky = token_cross_entropy(  # the same row with continuous positions and a plain causal mask
            model(input_ids=batch["input_ids"][:1], position_ids=torch.arange(n[0] + n[1])[None], use_cache=False).logits,
            batch["targets"][:1])
    assert int((batch["targets"] != IGNORE).sum()) > 20
    torch.testing.assert_close(packed[0, :n[0]], separate[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, n[0]:n[0] + n[1]], separate[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, :n[2]], separate[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky[0, n[0]:], separate[1], atol=1e-3)  # attention across samples would show


def test_varlen_attention_with_right_padding_matches_separate_samples(model_and_samples, tiny_tokenizer):
    """packing none pads micro batches on the right; the varlen attention builds no mask and stays exact."""
    from transformers import AutoModelForCausalLM

    from branchmerge.trainer.sft.attention import register

    path, samples = model_and_samples
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register()).eval()
    n = [len(s.input_ids) for s in samples]
    batch = collate([[(0, 0, n[0])], [(2, 0, n[2])]], samples, "none", tiny_tokenizer.pad_token_id)
    assert "attention_mask" in batch and n[0] != n[2]
    short = 0 if n[0] < n[2] else 1
    with torch.no_grad():
        padded = token_cross_entropy(model(**{k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")},
                                           use_cache=False).logits, batch["targets"])
        single = collate([[(short * 2, 0, n[short * 2])]], samples, "none", tiny_tokenizer.pad_token_id)
        alone = token_cross_entropy(model(input_ids=single["input_ids"], use_cache=False).logits, single["targets"])
    torch.testing.assert_close(padded[short, :n[short * 2]], alone[0], atol=1e-5, rtol=1e-5)
