"""The BranchSFT training loop on a DeepSpeed engine.

Loss normalisation: every optimizer step minimises the mean per-token loss over all assistant tokens of
the global batch. Each rank knows the global token count from the schedule (no communication), scales its
micro-batch token sum by world x accumulation / global tokens, and DeepSpeed's division by the
accumulation steps and averaging over ranks give back exactly that mean -- the same update for 1 or N ranks.

Devices: every tensor that reaches a model or a collective lives on ``engine.device`` (``cuda:<local rank>`` on
GPUs, ``cpu`` on the CPU accelerator). ``collate`` builds CPU tensors; ``to_device`` moves each micro batch; the
teacher is moved there once (``place_teacher``); the loss sums are created there. The only collective of the loop
is the all-reduce of the (CE, KD) token sums: float64 on ``engine.device``, which NCCL accepts (ncclFloat64, CUDA
tensors only) and gloo accepts on CPU. float64 keeps the sums of millions of per-token losses exact enough; see
``NCCL_DTYPES`` for what NCCL takes.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed

from ...api.outputs import write_json_atomic
from ..publish import atomic_folder
from . import checkpoint as ckpt
from . import token_cache
from .engine import (check_same_tokenizer, deepspeed_config, load_model, load_tokenizer,
                     optimizer_and_scheduler)
from . import ddk as ddk_mixing
from .build_locks import watch_build_locks
from .chunked_loss import KD, chunk_count, loss_sums, student_states, teacher_states
from .losses import TaidSchedule
from .packing import IGNORE, collate
from .schedule import Schedule, make_schedule
from .runtime import choose_precision, clean_shm, prepare_env

log = logging.getLogger("branchmerge.sft")
RESULT_FILE = "branchmerge_sft.json"  # training metrics and provenance, published with the model
# dtypes NCCL reduces (ncclInt8/Uint8/Int32/Int64/Float16/Float32/Float64/Bfloat16; torch sends bool as uint8),
# always on the rank's own CUDA device. The loop's collectives use float64 on engine.device.
NCCL_DTYPES = frozenset({torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16,
                         torch.bfloat16, torch.float32, torch.float64})


@dataclass
class RunState:
    step: int = 0
    tokens_seen: int = 0
    label_tokens: int = 0
    initial_loss: float | None = None
    last_loss: float | None = None
    last_ce: float | None = None
    last_kd: float | None = None
    history: list[float] = field(default_factory=list)
    taid: dict | None = None  # TaidSchedule.state()
    taid_history: list[float] = field(default_factory=list)
    taid_objectives: list[float] = field(default_factory=list)  # J_n: the step's mean TAID divergence
    ddk: dict | None = None  # DomainSampler.state()

    def client_state(self) -> dict:
        return {k: getattr(self, k) for k in ("step", "tokens_seen", "label_tokens", "initial_loss", "last_loss",
                                              "last_ce", "last_kd", "history", "taid", "taid_history", "taid_objectives",
                                              "ddk")}

    @classmethod
    def from_client_state(cls, state: dict) -> "RunState":
        return cls(**{k: state[k] for k in cls().client_state() if k in state})


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated (CPU) micro batch on the engine's device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def place_teacher(teacher, device: torch.device):
    """The teacher (a plain module, loaded on CPU) on the engine's device, where the student's inputs are."""
    return teacher.to(device)


def micro_batch_sums(engine, teacher, batch: dict[str, torch.Tensor], *, objective, taid_t: float,
                     chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, KD sum) of one micro batch (already on the engine's device), float32 scalars with grad.

    The logits are never materialised for all positions: chunked_loss computes them from the hidden states
    ``chunks`` slices at a time. The KD sum is 0 without a teacher."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    hidden, head = student_states(engine, getattr(engine, "module", engine), inputs)
    kd = teacher_hidden = teacher_head = None
    if teacher is not None:
        teacher_hidden, teacher_head = teacher_states(teacher, inputs)
        kd = kd_term(objective, taid_t)
    return loss_sums(hidden, head, batch["targets"], chunks=chunks, teacher_hidden=teacher_hidden,
                     teacher_head=teacher_head, kd=kd)


def kd_term(objective, taid_t: float) -> KD:
    """The distillation term of spec.objective at TAID weight ``taid_t``."""
    return KD(objective.divergence, temperature=objective.temperature, beta=objective.jsd_beta, taid_t=taid_t,
              sinkhorn_form=getattr(objective, "sinkhorn_form", "batch"),
              sinkhorn_iterations=getattr(objective, "sinkhorn_iterations", 20),
              sinkhorn_epsilon=getattr(objective, "sinkhorn_epsilon", 0.1),
              sinkhorn_group=getattr(objective, "sinkhorn_batch_tokens", 64))


def train_step(engine, teacher, micro_batches, samples, *, packing: str, pad_id: int, objective, n_labels: int,
               scale: float, taid_t: float, world_size: int, chunks: int | None = None) -> torch.Tensor:
    """One optimizer step of this rank: forward and backward of each of its micro batches (DeepSpeed steps the
    optimizer at the accumulation boundary). Returns the (CE, KD) token sums of the global batch: float64 on
    ``engine.device``, all-reduced over the ranks when there are several.

    ``chunks``: lm_head calls per micro batch (chunked_loss); the same for every micro batch of the run
    (ZeRO-3 needs one module order on every rank). None: from each micro batch's own size."""
    device = engine.device
    kd = teacher is not None
    w = objective.kd_weight if kd else 0.0
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # CE and KD token sums on this rank
    for micro in micro_batches:
        batch = to_device(collate(micro, samples, packing, pad_id), device)
        n_chunks = chunks or chunk_count(batch["input_ids"].numel())
        ce_sum, kd_sum = micro_batch_sums(engine, teacher, batch, objective=objective, taid_t=taid_t,
                                          chunks=n_chunks)
        loss_sum = (1 - w) * ce_sum + w * kd_sum if kd else ce_sum
        sums[0] += ce_sum.detach().double()
        if kd:
            sums[1] += kd_sum.detach().double()
        engine.backward(loss_sum * scale / n_labels)
        engine.step()
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    return sums


def _row_counts(rows, samples) -> tuple[int, int]:
    """(real tokens, trained target tokens) of some rows."""
    real = labels = 0
    for row in rows:
        for i, s, e in row:
            real += e - s
            labels += sum(1 for x in samples[i].labels[s + 1:e] if x != IGNORE)
    return real, labels


def _utilisation(schedule: Schedule, max_len: int) -> tuple[float, float]:
    """(row fill: real tokens / (rows x maxSeqLen), compute fill: real tokens / tokens in padded micro batches)
    over every step of the schedule."""
    real = computed = rows = 0
    for step in range(schedule.total_steps):
        for rank in range(schedule.world_size):
            for micro in schedule.micro_batches(step, rank):
                sizes = [sum(e - s for _, s, e in row) for row in micro]
                real += sum(sizes)
                computed += max(sizes) * len(sizes)
                rows += len(sizes)
    return (real / (rows * max_len) if rows else 0.0), (real / computed if computed else 0.0)


class _ProgressBar:
    """A rich progress bar on rank 0 when stderr is a terminal (local runs); silent otherwise."""

    def __init__(self, rank: int, total: int, done: int):
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=False)
            self.bar.start()
            self.task = self.bar.add_task("sft", total=total, completed=done)

    def update(self, done: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, description=f"sft loss {loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            with contextlib.suppress(Exception):
                self.bar.stop()


def _is_checkpoint_step(schedule: Schedule, every: int, done: int) -> bool:
    if done >= schedule.total_steps:
        return False  # the final weights are the output itself
    if every:
        return done % every == 0
    ends, acc = set(), 0
    for n in schedule.steps_by_epoch:
        acc += n
        ends.add(acc)
    return done in ends


def train(ctx) -> dict:
    spec = ctx.spec
    t = spec.training
    started = time.time()
    kd = spec.objective.type == "kd"

    base = ctx.input_path(spec.base, "spec.base")
    tokenizer = load_tokenizer(base, spec)
    teacher_path = None
    if kd:
        teacher_path = ctx.input_path(spec.objective.teacher, "spec.objective.teacher")
        check_same_tokenizer(tokenizer, load_tokenizer(teacher_path, spec), teacher_path)
    # tokenised once per run by rank 0 into the cache; the other ranks and retried attempts load it
    tokens_root = token_cache.cache_root(ctx.output_dir, spec.checkpointing.uri)
    samples, stats, token_status = token_cache.load_or_build(spec, tokenizer, base, ctx.input_path, tokens_root,
                                                             ctx.rank, ctx.world_size)
    if ctx.rank == 0:
        print(f"branchmerge sft: tokenCache: {token_status} ({tokens_root})", file=sys.stderr)
    lengths = [len(s.input_ids) for s in samples]
    domains = None
    if kd and spec.objective.ddk is not None:  # DDK: held-out validation samples per domain, rows by weight
        given = ddk_mixing.load_validation(spec, tokenizer, ctx.input_path, samples)
        domains = ddk_mixing.split_domains(spec, samples, stats.per_dataset, given)
        lengths = [len(s.input_ids) for s in samples]
        pool = sorted(j for members in domains.train for j in members)
        schedule = ddk_mixing.DomainSampler(make_schedule([lengths[j] for j in pool], t, ctx.world_size), domains,
                                        lengths, t.packing, t.max_seq_len, t.seed,
                                        ddk_mixing.initial_weights(domains))
    else:
        schedule = make_schedule(lengths, t, ctx.world_size)
    env = prepare_env()  # after validating inputs: a bad spec fails fast without touching the environment
    precision, precision_note = choose_precision(t.precision)
    if precision_note and env.rank == 0:
        print(f"branchmerge sft: {precision_note}", file=sys.stderr)
    ctx.progress.update(0.0, f"{stats.samples} samples, {schedule.total_steps} steps", force=True,
                        steps=schedule.total_steps, samples=stats.samples)

    watch_build_locks()  # DeepSpeed JIT-builds ops from here on; a killed earlier run may have left a lock
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if torch.cuda.is_available():  # this rank's GPU before any collective (NCCL binds the current device)
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    import torch.distributed as dist

    torch.manual_seed(t.seed)
    ds_config = deepspeed_config(spec, schedule.accumulation, precision)
    teacher = None
    if kd:  # loaded before the student: HfDeepSpeedConfig would partition it too
        teacher, _ = load_model(teacher_path, spec, precision, trainable=False)
    model, zero3_handle = load_model(base, spec, precision,
                                     zero3_config=ds_config if spec.deepspeed.zero_stage == 3 else None)
    optimizer, scheduler, warmup = optimizer_and_scheduler(model, spec, schedule.total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if teacher is not None:
        teacher = place_teacher(teacher, engine.device)

    root = ckpt.checkpoint_root(ctx.output_dir, spec.checkpointing.uri)
    fp = ckpt.fingerprint(spec, env.world_size)
    state, resumed_from = RunState(), None
    found = ckpt.complete_checkpoints(root, fp)
    if found:
        resumed_from, folder = found[-1]
        state = RunState.from_client_state(ckpt.load(engine, folder))
        if domains is not None:
            schedule.restore(state.ddk)
        if env.rank == 0:
            print(f"branchmerge sft: resumed from {folder} (step {state.step})", file=sys.stderr)

    pad_id = tokenizer.pad_token_id
    objective = spec.objective
    w = objective.kd_weight if kd else 0.0
    scale = env.world_size * schedule.accumulation
    chunks = chunk_count(t.micro_batch_size * t.max_seq_len)  # lm_head calls per micro batch (chunked_loss)
    taid = TaidSchedule(objective.taid_start, objective.taid_end, schedule.total_steps,
                        alpha=getattr(objective, "taid_alpha", 5e-4), beta=getattr(objective, "taid_beta", 0.99),
                        adaptive=getattr(objective, "taid_schedule", "linear") == "adaptive")
    taid.restore(state.taid)
    is_taid = kd and objective.divergence == "taid"
    teacher_losses: list[float] | None = None
    loop_started, session_tokens, checkpoint_bytes = time.time(), 0, 0
    bar = _ProgressBar(env.rank, schedule.total_steps, state.step)
    for step in range(state.step, schedule.total_steps):
        if domains is not None and step % objective.ddk.every_steps == 0:  # before this step's rows are dealt
            teacher_losses = _ddk_update(engine, teacher, samples, schedule, objective.ddk, step, t.micro_batch_size,
                                         pad_id, chunks, teacher_losses)
        real_tokens, n_labels = _row_counts(schedule.step_rows(step), samples)
        n_labels = max(n_labels, 1)
        lr = engine.get_lr()[0]
        taid_t = taid.value(step)
        sums = train_step(engine, teacher, schedule.micro_batches(step, env.rank), samples, packing=t.packing,
                          pad_id=pad_id, objective=objective, n_labels=n_labels, scale=scale, taid_t=taid_t,
                          world_size=env.world_size, chunks=chunks)
        ce, kd_value = (sums / n_labels).tolist()
        loss = (1 - w) * ce + w * kd_value if kd else ce
        state.step = step + 1
        state.tokens_seen += real_tokens
        state.label_tokens += n_labels
        state.initial_loss = loss if state.initial_loss is None else state.initial_loss
        state.last_loss, state.last_ce, state.last_kd = loss, ce, (kd_value if kd else None)
        state.history.append(round(loss, 6))
        if is_taid:
            state.taid_history.append(round(taid_t, 6))
            state.taid_objectives.append(kd_value)
            taid.update(step, kd_value)
            state.taid = taid.state()
        if domains is not None:
            state.ddk = schedule.state()
        session_tokens += real_tokens
        tps = session_tokens / max(time.time() - loop_started, 1e-9)
        ctx.progress.update(state.step / schedule.total_steps, f"step {state.step}/{schedule.total_steps}",
                            force=state.step == schedule.total_steps, step=state.step,
                            epoch=round(schedule.epoch_float(state.step), 4), loss=round(loss, 6), lr=lr,
                            tokensPerSecond=round(tps, 1), **({"taidT": round(taid_t, 6)} if is_taid else {}),
                            **({"checkpointBytes": checkpoint_bytes} if checkpoint_bytes else {}))
        bar.update(state.step, loss)
        if _is_checkpoint_step(schedule, spec.checkpointing.every_steps, state.step):
            saved = ckpt.save(engine, root, state.step, state.client_state(), fp, spec.checkpointing.keep,
                              env.rank, dist.barrier)
            if env.rank == 0:  # what the checkpoint volume must hold (keep + 1 of these while saving)
                checkpoint_bytes = max(checkpoint_bytes, ckpt.folder_bytes(saved))
    bar.close()
    train_seconds = time.time() - loop_started

    row_fill, compute_fill = (schedule.utilisation(t.max_seq_len) if domains is not None
                              else _utilisation(schedule, t.max_seq_len))
    metrics = {
        "finalLoss": state.last_loss, "initialLoss": state.initial_loss, "steps": state.step,
        "epoch": round(schedule.epoch_float(state.step), 4), "tokensSeen": state.tokens_seen,
        "labelTokens": state.label_tokens, "tokensPerSecond": round(session_tokens / max(train_seconds, 1e-9), 1),
        "packingUtilisation": round(row_fill, 6), "computeUtilisation": round(compute_fill, 6),
        "packing": t.packing, "rows": sum(len(r) for r in schedule.rows_by_epoch),
        "samples": stats.samples, "records": stats.records, "droppedSamples": stats.dropped,
        "truncatedSamples": stats.truncated, "worldSize": env.world_size,
        **({"decontamination": stats.decontaminated} if stats.decontaminated else {}),
        "gradientAccumulation": schedule.accumulation, "warmupSteps": warmup, "zeroStage": spec.deepspeed.zero_stage,
        "precision": precision, "resumedFromStep": resumed_from, "tokenCache": token_status,
    }
    if checkpoint_bytes:
        metrics["checkpointBytes"] = checkpoint_bytes
    if precision_note:
        metrics["precisionNote"] = precision_note
    if kd:
        metrics.update(finalCrossEntropy=state.last_ce, finalDivergence=state.last_kd,
                       divergence=objective.divergence)
    if is_taid and state.taid_history:
        # the per-step trajectory goes to the published result file (beside lossHistory), not into status
        metrics.update(taidSchedule=objective.taid_schedule, taidT=state.taid_history[-1])
    if domains is not None:
        last = schedule.history[-1] if schedule.history else {}
        metrics.update(domainWeights=dict(zip(domains.names, [round(w, 6) for w in schedule.weights])),
                       domainInitialWeights=dict(zip(domains.names, [round(w, 6) for w in
                                                                     ddk_mixing.initial_weights(domains)])),
                       domainStudentLoss=last.get("studentLoss", {}), domainTeacherLoss=last.get("teacherLoss", {}),
                       domainValidationSamples=dict(zip(domains.names, [len(v) for v in domains.validation])),
                       domainWeightsHistory=schedule.history)
    publish_model(ctx, engine, tokenizer, base, spec, env.rank, dist.barrier, metrics, state)
    metrics["wallSeconds"] = round(time.time() - started, 3)
    if env.rank == 0:  # the run is complete: its resumable state is no longer needed
        token_cache.remove(tokens_root)  # first: it may live inside the checkpoint root
        ckpt.remove_all(root)
    dist.barrier()
    clean_shm(env)
    del zero3_handle
    return metrics


def _ddk_update(engine, teacher, samples, schedule, ddk, step: int, micro: int, pad_id: int, chunks: int,
                teacher_losses: list[float] | None) -> list[float]:
    """Measure each domain's student and teacher CE on its validation samples and update the sampling weights
    (ddk.py). Every rank evaluates the same batches (ZeRO-3 gathers in the same order everywhere) and so
    computes the same weights. The teacher is frozen: its losses are measured once per run."""
    domains = schedule.domains
    device = engine.device
    module = getattr(engine, "module", engine)
    was_training = module.training
    module.eval()
    student = [ddk_mixing.domain_losses(lambda inputs: student_states(engine, module, inputs), samples, idx, micro,
                                        pad_id, chunks, device) for idx in domains.validation]
    if was_training:
        module.train()
    if teacher_losses is None:
        teacher_losses = [ddk_mixing.domain_losses(lambda inputs: teacher_states(teacher, inputs), samples, idx,
                                                   micro, pad_id, chunks, device) for idx in domains.validation]
    schedule.weights = ddk_mixing.smooth_update(schedule.weights, student, teacher_losses, ddk.smoothing)
    schedule.history.append({"step": step, "weights": dict(zip(domains.names, [round(w, 6) for w in schedule.weights])),
                         "studentLoss": dict(zip(domains.names, [round(x, 6) for x in student])),
                         "teacherLoss": dict(zip(domains.names, [round(x, 6) for x in teacher_losses]))})
    return teacher_losses


def publish_model(ctx, engine, tokenizer, base: Path, spec, rank: int, barrier, metrics: dict,
                  state: RunState) -> None:
    """Write the HF folder atomically on rank 0 (ZeRO-3: gather the partitioned weights first)."""
    from transformers import AutoConfig

    if spec.deepspeed.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank must call it
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        base_dtype = getattr(AutoConfig.from_pretrained(base, trust_remote_code=spec.trust_remote_code), "dtype",
                             None)
        if isinstance(base_dtype, str):
            base_dtype = getattr(torch, base_dtype)
        if base_dtype is not None:
            state_dict = {k: v.to(base_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        module = engine.module
        module.config.use_cache = True
        if base_dtype is not None:
            module.config.dtype = base_dtype
        with atomic_folder(ctx.output_dir) as tmp:
            module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size="5GB")
            tokenizer.save_pretrained(tmp)
            extra = {"taidHistory": {"t": state.taid_history, "objective": state.taid_objectives}} \
                if state.taid_history else {}
            write_json_atomic(tmp / RESULT_FILE, {"metrics": metrics, "lossHistory": state.history, **extra,
                                                  "spec": spec.model_dump(mode="json", by_alias=True)})
    barrier()
