"""The chunked loss (chunked_loss.py) against the unchunked computation it replaces: the same CE and KD sums
and the same gradients, for every divergence, with padded and packed rows, and with an uneven or empty
split; the full-width logits are never kept for the backward. ZeRO-3 (partitioned and tied lm_head) runs in
a subprocess: test_zero3_tied_head_matches_plain_torch.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from branchmerge.trainer.sft.chunked_loss import KD, chunk_count, loss_sums, output_head, student_states
from branchmerge.trainer.sft.losses import divergence, token_cross_entropy
from branchmerge.trainer.sft.packing import IGNORE, Sample, collate, pack
from branchmerge.trainer.sft.train import micro_batch_sums

from .sft_helpers import stage_env

KINDS = [None, "forward-kl", "reverse-kl", "jsd", "taid"]


@pytest.fixture(scope="module")
def models(tiny_model):
    """The tiny Qwen2 student (fp32) and a teacher: the same architecture with perturbed weights."""
    from transformers import AutoModelForCausalLM

    from branchmerge.trainer.sft.engine import attention_implementation

    student = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention_implementation())
    student.config.use_cache = False
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return student, teacher


def samples(vocab: int) -> list[Sample]:
    out = []
    for i, n in enumerate([9, 5, 12, 7, 3, 10, 14, 6]):
        ids = [(i * 37 + k * 11) % vocab for k in range(n)]
        labels = [IGNORE] * (n // 2) + ids[n // 2:]  # the prompt half is not trained
        out.append(Sample(ids, labels))
    return out


def batch_of(packing: str, vocab: int) -> dict[str, torch.Tensor]:
    data = samples(vocab)
    rows = pack([len(s.input_ids) for s in data], list(range(len(data))), packing, 24)
    return collate(rows[:3], data, packing, pad_id=0)


def objective(kind: str) -> SimpleNamespace:
    return SimpleNamespace(kd_weight=0.6, divergence=kind, temperature=2.0, jsd_beta=0.3)


def unchunked_sums(model, teacher, batch, kind: str | None, taid_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What train_step computed before chunking: all logits, upcast at once."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    logits = model(**inputs, use_cache=False).logits
    targets = batch["targets"]
    ce = token_cross_entropy(logits, targets).sum()
    if kind is None:
        return ce, torch.zeros(())
    with torch.no_grad():
        teacher_logits = teacher(**inputs, use_cache=False).logits
    obj = objective(kind)
    per_token = divergence(logits, teacher_logits, kind, temperature=obj.temperature, beta=obj.jsd_beta,
                           taid_t=taid_t)
    return ce, torch.where(targets != IGNORE, per_token, torch.zeros_like(per_token)).sum()


def loss_and_grads(model, fn) -> tuple[list[float], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ce, kd = fn()
    (0.4 * ce + 0.6 * kd).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [ce.item(), kd.item()], grads


@pytest.mark.parametrize("packing", ["none", "neat"])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_loss_and_gradients_match_unchunked(models, packing, kind):
    student, teacher = models
    batch = batch_of(packing, student.config.vocab_size)
    assert ("attention_mask" in batch) == (packing == "none")  # padded rows vs packed rows (position ids)
    teacher_or_none = teacher if kind else None
    taid_t = 0.4
    ref_values, ref_grads = loss_and_grads(student, lambda: unchunked_sums(student, teacher, batch, kind, taid_t))
    # 3 slices of an odd number of positions: uneven; each its own lm_head call and checkpoint
    values, grads = loss_and_grads(student, lambda: micro_batch_sums(
        student, teacher_or_none, batch, objective=objective(kind or "forward-kl"), taid_t=taid_t, chunks=3))
    assert values == pytest.approx(ref_values, rel=1e-5, abs=1e-6)
    assert ref_values[0] > 0 and (ref_values[1] > 0 if kind else ref_values[1] == 0)
    assert set(grads) == set(ref_grads) and "lm_head.weight" in grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunks", [1, 7, 200])
def test_any_split_gives_the_same_sums_even_with_empty_slices(models, chunks):
    student, teacher = models
    batch = batch_of("neat", student.config.vocab_size)
    assert batch["input_ids"].numel() < 200  # 200 slices: most of them empty
    ref = unchunked_sums(student, teacher, batch, "jsd", 0.0)
    got = micro_batch_sums(student, teacher, batch, objective=objective("jsd"), taid_t=0.0, chunks=chunks)
    assert [x.item() for x in got] == pytest.approx([x.item() for x in ref], rel=1e-5)


def test_the_student_head_maps_its_hidden_states_to_its_logits(models):
    student, _ = models
    batch = batch_of("neat", student.config.vocab_size)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    hidden, head = student_states(student, student, inputs)
    assert head is student.lm_head and hidden.shape[-1] == student.config.hidden_size
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), student(**inputs).logits)


def test_models_with_post_processed_logits_fall_back_to_their_own_logits(models):
    student, _ = models
    assert output_head(student) is student.lm_head
    other = SimpleNamespace(get_output_embeddings=lambda: student.lm_head, forward=student.forward,
                            config=SimpleNamespace(final_logit_softcapping=30.0))
    assert output_head(other) is None  # Gemma's tanh soft-capping is not lm_head(hidden)
    other.config = SimpleNamespace(final_logit_softcapping=None, logit_scale=1.0)
    assert output_head(other) is student.lm_head


def test_no_full_width_logits_are_kept_for_the_backward(models):
    """What the graph saves for the backward: the unchunked loss keeps positions x vocab tensors (the logits,
    their fp32 log-softmax), the chunked one only the hidden states of each slice."""
    student, teacher = models
    batch = batch_of("none", student.config.vocab_size)
    vocab = student.config.vocab_size

    def saved_vocab_elements(fn) -> int:
        seen = []

        def pack_hook(t):
            seen.append(t.numel() if t.dim() and t.shape[-1] == vocab else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            fn()
        return sum(seen)

    assert saved_vocab_elements(lambda: unchunked_sums(student, teacher, batch, "forward-kl", 0.0)) \
        >= batch["input_ids"].numel() * vocab
    hidden, head = student_states(student, student, {k: batch[k] for k in ("input_ids", "position_ids",
                                                                           "attention_mask")})
    assert saved_vocab_elements(lambda: loss_sums(hidden, head, batch["targets"], chunks=4, kd=KD("forward-kl"),
                                                  teacher_hidden=hidden.detach(), teacher_head=head)) == 0


def test_chunk_count():
    assert [chunk_count(n) for n in (1, 1024, 1025, 16384)] == [1, 1, 2, 16]


ZERO3_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from types import SimpleNamespace
    import torch
    from transformers import AutoModelForCausalLM
    from branchmerge.trainer.sft.engine import load_model
    from branchmerge.trainer.sft.packing import IGNORE, Sample, collate, pack
    from branchmerge.trainer.sft.train import micro_batch_sums
    from branchmerge.trainer.sft.losses import divergence, token_cross_entropy
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    model_dir = sys.argv[1]
    data = [Sample([(i * 37 + k * 11) % 200 for k in range(n)], [IGNORE] * 3 + [(i * 37 + k * 11) % 200
            for k in range(3, n)]) for i, n in enumerate([9, 5, 12, 7])]
    batch = collate(pack([9, 5, 12, 7], [0, 1, 2, 3], "neat", 24), data, "neat", 0)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    obj = SimpleNamespace(kd_weight=0.5, divergence="forward-kl", temperature=1.0, jsd_beta=0.5)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir).eval().requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(1.1)

    # reference: plain torch, unchunked, on the same (tied) weights
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    logits = plain(**inputs, use_cache=False).logits
    ce = token_cross_entropy(logits, batch["targets"]).sum()
    per = divergence(logits, teacher(**inputs, use_cache=False).logits, "forward-kl")
    kd = torch.where(batch["targets"] != IGNORE, per, torch.zeros_like(per)).sum()
    (0.5 * ce + 0.5 * kd).backward()
    ref = {n: p.grad for n, p in plain.named_parameters()}
    out = {"ref": {"ce": ce.item(), "kd": kd.item()}}

    config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
              "steps_per_print": 1 << 30}
    spec = SimpleNamespace(trust_remote_code=False, training=SimpleNamespace(gradient_checkpointing=True))
    deepspeed.init_distributed(dist_backend="gloo")
    model, handle = load_model(model_dir, spec, "fp32", zero3_config=config)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    assert engine.module.lm_head.weight.ds_numel > engine.module.lm_head.weight.numel()  # partitioned
    for attempt in range(3):  # a recorded ZeRO-3 module trace, then runs that replay it
        ce, kd = micro_batch_sums(engine, teacher, batch, objective=obj, taid_t=0.0, chunks=3)
        engine.backward(0.5 * ce + 0.5 * kd)
        worst = max((safe_get_full_grad(p) - ref[n]).abs().max().item() / (ref[n].abs().max().item() + 1e-12)
                    for n, p in engine.module.named_parameters())
        out[attempt] = {"ce": ce.item(), "kd": kd.item(), "worst": worst}
        engine.step()
    print("RESULT " + json.dumps(out))
    os._exit(0)
""")


@pytest.mark.slow
def test_zero3_tied_head_matches_plain_torch(tmp_path):
    """ZeRO-3, 1 rank, lm_head tied to embed_tokens and partitioned: the chunked loss called through the
    engine (the head gathered by its hooks, again in each recomputation) gives plain torch's gradients."""
    from branchmerge.trainer.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True, vocab_size=200)
    script = tmp_path / "zero3.py"
    script.write_text(ZERO3_SCRIPT)
    env = stage_env()
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    proc = subprocess.run([sys.executable, str(script), str(model_dir)], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT "):])
    for attempt in ("0", "1", "2"):
        assert result[attempt]["worst"] < 1e-4, result
        assert result[attempt]["ce"] == pytest.approx(result["ref"]["ce"], rel=1e-5)
        assert result[attempt]["kd"] == pytest.approx(result["ref"]["kd"], rel=1e-5)


def _port() -> int:
    from branchmerge.trainer.sft.runtime import free_port

    return free_port()
