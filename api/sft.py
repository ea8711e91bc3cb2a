"""BranchSFT: one copy of the student fine-tuned on one domain with DeepSpeed."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import ApiModel, Rule
from .common import DatasetRef, ModelRef, Output, Resources, RunPolicy, Uri
from .decontamination import Decontamination

FieldName = Annotated[str, Field(min_length=1, max_length=128)]


class TrainingData(DatasetRef):
    """A dataset with its mixing weight and record layout."""

    weight: Annotated[float, Field(gt=0)] = 1.0
    """Relative sampling weight among the datasets (1.0 each = plain concatenation)."""
    format: Literal["auto", "messages", "prompt-response"] = "auto"
    """auto: the `messages` field (OpenAI role/content turns), else `conversations` (ShareGPT from/value, with a
    separate `system` column as in OpenThoughts), else prompt/response."""
    messages_field: FieldName = "messages"
    prompt_field: FieldName = "prompt"
    response_field: FieldName = "response"
    require_true: FieldName | None = None
    """Keep only records whose field is true (a list: any element true; null: dropped), e.g.
    ``correctness_math_verify`` for OpenR1-Math."""
    domain: Annotated[str, Field(pattern=r"^[a-z0-9][-a-z0-9_]*$", max_length=63)] | None = None
    """Domain label of this dataset (objective.ddk weighs the datasets by domain; default ``data<i>``)."""
    validation: DatasetRef | None = None
    """objective.ddk: this domain's validation records (this dataset's layout fields; at most
    ddk.validationSamples of them, seeded); default: ddk.validationSamples records held out of the dataset."""


class Training(ApiModel):
    """Optimisation hyperparameters (TinyR1 defaults where the paper gives them)."""

    epochs: Annotated[float, Field(gt=0, le=1000)] = 1.0
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 1e-5
    scheduler: Literal["constant_with_warmup", "cosine", "linear"] = "constant_with_warmup"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    global_batch_size: Annotated[int, Field(ge=1)] = 32
    """Sequences (packed rows) per optimizer step over all ranks."""
    micro_batch_size: Annotated[int, Field(ge=1)] = 1
    """Sequences per rank per forward pass; accumulation = global / (micro x world size)."""
    max_seq_len: Annotated[int, Field(ge=16, le=1_048_576)] = 16384
    over_length: Literal["drop", "truncate"] = "drop"
    """What to do with samples longer than maxSeqLen (counted in metrics either way)."""
    packing: Literal["none", "greedy", "neat"] = "neat"
    """none: one sample per row; greedy: concatenated; neat: several samples per row, no attention across them."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    adam_betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.9, 0.95])
    adam_epsilon: Annotated[float, Field(gt=0)] = 1e-8
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    """Max gradient norm; 0 disables clipping."""
    seed: int = 42
    gradient_checkpointing: bool = True
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Mixed precision; bf16 falls back to fp32 where the hardware lacks it (reported in metrics)."""


class DomainMixing(ApiModel):
    """DDK (Liu et al., 2024): the datasets are domains, sampled by weights that follow the teacher-student
    gap on held-out per-domain validation data (trainer/sft/README.md, "Which distillation method")."""

    every_steps: Annotated[int, Field(ge=1)] = 1000
    """Distillation interval: the gap is measured and the weights updated every N optimizer steps (and before
    the first)."""
    smoothing: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Factor smooth updating: weights = smoothing * normalised(previous weights * exp(studentCE / teacherCE))
    + (1 - smoothing) / domains. 1: no smoothing toward uniform."""
    validation_samples: Annotated[int, Field(ge=1, le=100000)] = 64
    """Samples held out of each dataset (seeded) to measure the student's and the teacher's cross-entropy."""


class Objective(ApiModel):
    """Plain SFT on traces, or token-level distillation against a teacher with the same tokenizer."""

    rules = (
        Rule("self.type != 'kd' || has(self.teacher)", "the kd objective needs a teacher", ".teacher",
             "FieldValueRequired"),
        Rule("self.type != 'sft' || !has(self.teacher)", "a teacher is only used by the kd objective", ".teacher",
             "FieldValueForbidden"),
        Rule("self.taidStart <= self.taidEnd", "taidStart must not exceed taidEnd", ".taidStart"),
        Rule("!has(self.ddk) || self.type == 'kd'",
             "ddk weighs domains by the teacher-student gap: it needs type kd and a teacher", ".ddk",
             "FieldValueForbidden"),
    )
    type: Literal["sft", "kd"] = "sft"
    teacher: ModelRef | None = None
    divergence: Literal["forward-kl", "reverse-kl", "jsd", "taid", "sinkhorn"] = "forward-kl"
    kd_weight: Annotated[float, Field(ge=0, le=1)] = 0.5
    """loss = (1 - kdWeight) * CE + kdWeight * divergence."""
    temperature: Annotated[float, Field(gt=0, le=100)] = 1.0
    jsd_beta: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """Skew of the generalised JSD mixture (0.5 = symmetric)."""
    taid_schedule: Literal["adaptive", "linear"] = "adaptive"
    """TAID's interpolation weight t: adaptive (the paper's momentum update from the objective's relative
    change, bounded below by the linear schedule) or linear from taidStart to taidEnd."""
    taid_start: Annotated[float, Field(ge=0, le=1)] = 0.4
    """TAID's t at the first step (paper: 0.4)."""
    taid_end: Annotated[float, Field(ge=0, le=1)] = 1.0
    """TAID's t at the end of training, its upper bound (paper: 1.0)."""
    taid_alpha: Annotated[float, Field(gt=0, le=1)] = 5e-4
    """Adaptive TAID: step size of t's update, t += alpha * sigmoid(momentum) * (1 - t) (paper: 5e-4)."""
    taid_beta: Annotated[float, Field(ge=0, lt=1)] = 0.99
    """Adaptive TAID: momentum of the objective's relative change (paper: 0.99)."""
    sinkhorn_form: Literal["batch", "token"] = "batch"
    """batch (SinKD's batch-wise form): transport between the token distributions of sinkhornBatchTokens
    positions, cost ||q_i - p_j||_1; token: per position, transport over the vocabulary with the 0/1 cost."""
    sinkhorn_iterations: Annotated[int, Field(ge=1, le=1000)] = 20
    """Sinkhorn iterations (log domain) (SinKD: 20)."""
    sinkhorn_epsilon: Annotated[float, Field(gt=0, le=100)] = 0.1
    """Entropic regulariser of the transport (SinKD: 0.1); smaller is closer to exact optimal transport."""
    sinkhorn_batch_tokens: Annotated[int, Field(ge=2, le=1024)] = 64
    """Batch form: positions per transport problem (cost grows with its square times the vocabulary)."""
    ddk: DomainMixing | None = None
    """DDK domain mixing over spec.data (at least two datasets, the domains)."""


class DeepSpeed(ApiModel):
    rules = (
        Rule("self.offloadParams == 'none' || self.zeroStage == 3", "offloadParams needs zeroStage 3",
             ".offloadParams"),
    )
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"


class Checkpointing(ApiModel):
    """Resumable checkpoints. Each holds the DeepSpeed state: with Adam and bf16 about 14 bytes per parameter
    (bf16 weights, fp32 master weights, two fp32 moments), ~460 GB for a 32.8B model; the volume needs room
    for ``keep`` + 1 of them while a new one is written. They are deleted once the model is published."""

    rules = (
        Rule("!has(self.uri) || self.uri.startsWith('pvc://') || self.uri.startsWith('file:///')",
             "checkpoints need a writable location: pvc://claim/path or file:///path", ".uri", "FieldValueInvalid"),
    )
    every_steps: Annotated[int, Field(ge=0)] = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at epoch ends)."""
    keep: Annotated[int, Field(ge=1, le=1000)] = 2
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    uri: Uri | None = None
    """Where checkpoints go, e.g. a scratch PVC apart from the models volume (one folder per BranchSFT);
    default: beside the output, in ``.<output name>.checkpoints``."""


class BranchSFTSpec(ApiModel):
    """Fine-tune the base model on one domain's data."""

    base: ModelRef
    data: Annotated[list[TrainingData], Field(min_length=1, max_length=64)]
    decontaminate: Decontamination | None = None
    """Drop training records whose user turns match these benchmarks' questions (counted in metrics)."""
    domain: Annotated[str, Field(pattern=r"^[a-z0-9][-a-z0-9_]*$", max_length=63)] | None = None
    """Free label (math, code, science, ...) shown in kubectl get and reports."""
    chat_template: Annotated[str, Field(max_length=65536)] | None = None
    """Jinja chat template overriding the base model's."""
    training: Training = Field(default_factory=Training)
    objective: Objective = Field(default_factory=Objective)
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed)
    checkpointing: Checkpointing = Field(default_factory=Checkpointing)
    trust_remote_code: bool = False
    output: Output = Field(default_factory=Output)
    resources: Resources = Field(default_factory=Resources)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)

    rules = (
        Rule(
            "self.training.globalBatchSize % (self.training.microBatchSize * self.resources.nodes"
            " * (self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1)) == 0",
            "training.globalBatchSize must be a multiple of microBatchSize x nodes x gpusPerNode",
            ".training.globalBatchSize",
        ),
        Rule("!has(self.objective.ddk) || size(self.data) >= 2",
             "objective.ddk mixes domains: spec.data needs at least two datasets (one per domain)",
             ".objective.ddk"),
    )
