"""Every tensor that reaches a model or a collective in the training step is on the engine's device.

On GPUs DeepSpeed's engine lives on ``cuda:<local rank>`` while ``collate`` builds CPU tensors; NCCL rejects CPU
tensors (and float64 anywhere but CUDA). Here the engine reports the ``meta`` device -- a device other than the
batch's default (CPU) -- and the student and teacher live there: forward pre-hooks record the device of every
tensor they receive, a wrapper around ``torch.distributed.all_reduce`` records device and dtype, and the real
``train_step`` runs against them. The collective's dtype must be one NCCL reduces (float64 included: NCCL takes
ncclFloat64 for CUDA tensors, and the step's sums live on the engine's CUDA device there).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from branchmerge.trainer.sft import train as train_mod
from branchmerge.trainer.sft.losses import divergence, token_cross_entropy
from branchmerge.trainer.sft.packing import IGNORE, Sample, collate, pack

# ncclDataType_t: int8, uint8, int32, uint32, int64, uint64, float16, float32, float64, bfloat16 (torch maps bool
# to uint8); written out here, independently of train.NCCL_DTYPES
NCCL_REDUCIBLE = {torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32,
                  torch.float64, torch.bfloat16}
VOCAB, HIDDEN = 40, 16


class TinyLM(torch.nn.Module):
    """A stand-in causal LM (HF call signature) whose ops all run on the meta device."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.pos = torch.nn.Embedding(64, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=None):
        h = self.embed(input_ids) + self.pos(position_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return SimpleNamespace(logits=self.head(torch.tanh(h)))


def record_inputs(model: torch.nn.Module, seen: list) -> None:
    def hook(module, args, kwargs):
        for value in [*args, *kwargs.values()]:
            if isinstance(value, torch.Tensor):
                seen.append(value.device)

    model.register_forward_pre_hook(hook, with_kwargs=True)


class FakeEngine:
    """What train_step uses of a DeepSpeed engine: device, __call__, backward, step."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.backward_devices: list[torch.device] = []
        self.steps = 0

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss):
        self.backward_devices.append(loss.device)
        loss.backward()

    def step(self):
        self.steps += 1


def samples() -> list[Sample]:
    out = []
    for i, n in enumerate([9, 5, 12, 7, 3, 10]):
        ids = [(i * 7 + k) % VOCAB for k in range(n)]
        labels = [IGNORE] * (n // 2) + ids[n // 2:]  # the prompt half is not trained
        out.append(Sample(ids, labels))
    return out


def micro_batches(data: list[Sample], packing: str) -> list[list]:
    rows = pack([len(s.input_ids) for s in data], list(range(len(data))), packing, 16)
    return [rows[k:k + 2] for k in range(0, len(rows), 2)]


def objective(kind: str = "forward-kl") -> SimpleNamespace:
    return SimpleNamespace(kd_weight=0.6, divergence=kind, temperature=2.0, jsd_beta=0.3)


@pytest.fixture
def collectives(monkeypatch) -> list[tuple[torch.device, torch.dtype]]:
    calls = []

    def all_reduce(tensor, *args, **kwargs):
        calls.append((tensor.device, tensor.dtype))

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    return calls


@pytest.mark.parametrize("packing", ["none", "neat"])
@pytest.mark.parametrize("kind", [None, "forward-kl", "reverse-kl", "jsd", "taid"])
def test_step_puts_every_model_and_collective_tensor_on_the_engine_device(packing, kind, collectives):
    device = torch.device("meta")  # not the CPU default that collate builds on
    student_seen, teacher_seen = [], []
    student = TinyLM(0).to(device)
    record_inputs(student, student_seen)
    engine = FakeEngine(student, device)
    teacher = None
    if kind:
        teacher = train_mod.place_teacher(TinyLM(1).eval().requires_grad_(False), device)  # loaded on CPU
        assert {p.device for p in teacher.parameters()} == {device}
        record_inputs(teacher, teacher_seen)
    data = samples()
    micros = micro_batches(data, packing)

    sums = train_mod.train_step(engine, teacher, micros, data, packing=packing, pad_id=0,
                                objective=objective(kind or "forward-kl"), n_labels=20, scale=2.0, taid_t=0.5,
                                world_size=2)

    assert engine.steps == len(micros)
    assert student_seen and set(student_seen) == {device}
    assert (set(teacher_seen) == {device}) if kind else not teacher_seen
    assert set(engine.backward_devices) == {device}
    assert sums.device == device and sums.shape == (2,)
    # the one collective: on the engine's device, in a dtype NCCL reduces
    assert collectives == [(device, torch.float64)]
    assert all(d == engine.device for d, _ in collectives)
    assert {dtype for _, dtype in collectives} <= NCCL_REDUCIBLE
    assert {dtype for _, dtype in collectives} <= train_mod.NCCL_DTYPES


def test_single_rank_step_has_no_collective(collectives):
    data = samples()
    engine = FakeEngine(TinyLM(0), torch.device("cpu"))
    train_mod.train_step(engine, None, micro_batches(data, "neat"), data, packing="neat", pad_id=0,
                         objective=objective(), n_labels=20, scale=1.0, taid_t=0.0, world_size=1)
    assert collectives == []


@pytest.mark.parametrize("kind", ["forward-kl", "jsd", "taid"])
def test_step_sums_match_the_masked_token_losses_on_cpu(kind, collectives):
    """The KD sum is masked with torch.where (no device-to-host sync): the same value as selecting the targets."""
    data = samples()
    micros = micro_batches(data, "none")
    student, teacher = TinyLM(0), TinyLM(1).eval().requires_grad_(False)
    obj = objective(kind)
    sums = train_mod.train_step(FakeEngine(student, torch.device("cpu")), teacher, micros, data, packing="none",
                                pad_id=0, objective=obj, n_labels=20, scale=1.0, taid_t=0.4, world_size=1)
    ce = kd = 0.0
    with torch.no_grad():
        for micro in micros:
            batch = collate(micro, data, "none", 0)
            inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
            s, t = student(**inputs).logits, teacher(**inputs).logits
            mask = batch["targets"] != IGNORE
            ce += token_cross_entropy(s, batch["targets"]).sum().item()
            kd += divergence(s[mask], t[mask], kind, temperature=obj.temperature, beta=obj.jsd_beta,
                             taid_t=0.4).sum().item()
    assert sums.dtype == torch.float64
    assert sums.tolist() == pytest.approx([ce, kd], rel=1e-5)
