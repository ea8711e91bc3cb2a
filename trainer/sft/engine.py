"""Model, teacher, optimizer, scheduler and the DeepSpeed config built from the spec."""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import InvalidInput

NO_DECAY = ("bias", "norm")  # biases and norm scales are not weight-decayed (as in the HF Trainer)


def deepspeed_config(spec, accumulation: int, precision: str) -> dict:
    t, ds = spec.training, spec.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer == "cpu":
        if ds.zero_stage == 0:
            raise InvalidInput("spec.deepspeed.offloadOptimizer: cpu offload needs zeroStage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.offload_params == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # torch's AdamW as the client optimizer: correct with ZeRO and offload, and no CPU-Adam JIT build
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def load_tokenizer(path: Path, spec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    # transformers records how it was loaded (HF_HUB_OFFLINE -> local_files_only) and saves it with the
    # tokenizer: the published tokenizer_config.json would then differ between a pod and a laptop
    tokenizer.init_kwargs.pop("local_files_only", None)
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    if not tokenizer.chat_template:
        raise InvalidInput(f"spec.base: the tokenizer at {path} has no chat template; set spec.chatTemplate")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_tokenizer(student_tok, teacher_tok, teacher_path: Path) -> None:
    """Token-level distillation compares distributions id by id: the vocabularies must be identical."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        diff = len(set(s.items()) ^ set(t.items()))
        raise InvalidInput(f"spec.objective.teacher: tokenizer at {teacher_path} differs from the base model's "
                           f"({len(t)} vs {len(s)} tokens, {diff} differing entries); token-level KD needs the "
                           "same tokenizer")


def attention_implementation() -> str:
    """flash-attention 2 (varlen from position ids) on GPUs that have it, else per-sample SDPA (attention.py)."""
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    from .attention import register

    return register()


def load_model(path: Path, spec, precision: str, *, trainable: bool = True, zero3_config: dict | None = None):
    """Load a causal LM. With ``zero3_config`` the weights are partitioned while loading (deepspeed.zero.Init
    through transformers' HfDeepSpeedConfig), so no rank ever holds a full copy; the returned handle must
    stay referenced while the model is in use."""
    import torch
    from transformers import AutoModelForCausalLM

    handle = None
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        handle = HfDeepSpeedConfig(zero3_config)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     attn_implementation=attention_implementation(),
                                                     trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:
        raise InvalidInput(f"cannot load a causal LM from {path}: {err}") from None
    model.config.use_cache = False
    if trainable:
        if spec.training.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    else:
        model.eval().requires_grad_(False)
    return model, handle


def optimizer_and_scheduler(model, spec, total_steps: int):
    import torch
    from transformers import get_scheduler

    t = spec.training
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=t.adam_epsilon)
    warmup = math.ceil(t.warmup_ratio * total_steps)

    def make_scheduler(wrapped_optimizer):
        # built on the optimizer DeepSpeed hands back: ZeRO-3 regroups the parameters of the client optimizer
        return get_scheduler(t.scheduler, wrapped_optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    return optimizer, make_scheduler, warmup
