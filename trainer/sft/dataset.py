"""From spec.data to tokenised samples: load, template, mask, apply the over-length policy, mix by weight.

spec.chatTemplate renders the training data only. The tokenizer that is published with the branch (and
copied into every merge) keeps the base model's own template: the final model is prompted at eval the way
its base was. Only a base without any template publishes spec.chatTemplate (there is nothing else to keep).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..decontamination import add_counts, counts, gate_of
from ..errors import InvalidInput
from .chat import encode
from .packing import Sample
from .records import Layout, load_dataset, mix


@dataclass
class DataStats:
    records: int = 0
    samples: int = 0  # after mixing
    dropped: int = 0  # over maxSeqLen (drop policy) or nothing left to learn after truncation
    truncated: int = 0
    no_label_after_truncation: int = 0
    shortest_prompt: int | None = None
    per_dataset: list[int] = field(default_factory=list)
    decontaminated: dict[str, int] = field(default_factory=dict)  # reason -> records dropped (spec.decontaminate)


def _prompt_length(labels: list[int]) -> int:
    return next((i for i, x in enumerate(labels) if x != -100), len(labels))


def training_template(spec, tokenizer) -> str | None:
    """The template the data is rendered with; leaves ``tokenizer`` with the base model's own one.

    engine.load_tokenizer sets spec.chatTemplate on the tokenizer; transformers keeps the template read from
    the base folder in ``init_kwargs``, which is put back so that ``save_pretrained`` publishes it.
    """
    template = spec.chat_template or tokenizer.chat_template
    if spec.chat_template:
        base = getattr(tokenizer, "init_kwargs", {}).get("chat_template")
        if base:
            tokenizer.chat_template = base
    return template


def _decontaminate(gate, conversations: list[list[dict]], stats: DataStats, what: str) -> list[list[dict]]:
    """The conversations whose user turns match no benchmark question (spec.decontaminate)."""
    reasons = gate.check_records([[m["content"] for m in messages if m["role"] == "user"]
                                  for messages in conversations])
    stats.decontaminated = add_counts(stats.decontaminated, counts(reasons))
    kept = [messages for messages, reason in zip(conversations, reasons) if reason is None]
    if not kept:
        raise InvalidInput(f"{what}: all {len(conversations)} records match the benchmarks of "
                           f"spec.decontaminate ({counts(reasons)}); nothing is left to train on")
    return kept


def build_samples(spec, tokenizer, input_path) -> tuple[list[Sample], DataStats]:
    """``input_path(ref, what)`` resolves a dataset ref to a local path (StageContext.input_path).

    Renders with spec.chatTemplate when set, and leaves the base model's template on ``tokenizer``
    (:func:`training_template`).
    """
    template = training_template(spec, tokenizer)
    training = spec.training
    max_len = training.max_seq_len
    stats = DataStats()
    kept_per_dataset: list[list[Sample]] = []
    gate = gate_of(getattr(spec, "decontaminate", None), input_path, "spec.decontaminate")
    if gate is not None:
        stats.decontaminated = counts(())
    for i, ref in enumerate(spec.data):
        what = f"spec.data[{i}]"
        conversations = load_dataset(input_path(ref, what), Layout.of(ref), what)
        stats.records += len(conversations)
        if gate is not None:
            conversations = _decontaminate(gate, conversations, stats, what)
        kept = []
        for messages in conversations:
            enc = encode(tokenizer, messages, template)
            if enc.n_label_tokens == 0:
                raise InvalidInput(f"{what}: a record renders without assistant tokens (empty response?)")
            prompt = _prompt_length(enc.labels)
            stats.shortest_prompt = prompt if stats.shortest_prompt is None else min(stats.shortest_prompt, prompt)
            ids, labels = enc.input_ids, enc.labels
            if len(ids) > max_len:
                if training.over_length == "drop":
                    stats.dropped += 1
                    continue
                ids, labels = ids[:max_len], labels[:max_len]
                if all(x == -100 for x in labels[1:]):  # the prompt alone fills maxSeqLen
                    stats.dropped += 1
                    stats.no_label_after_truncation += 1
                    continue
                stats.truncated += 1
            kept.append(Sample(ids, labels))
        if not kept:
            raise InvalidInput(
                f"spec.training.maxSeqLen={max_len}: no sample of {what} fits "
                f"({len(conversations)} records; shortest prompt {stats.shortest_prompt} tokens, "
                f"overLength={training.over_length}); raise maxSeqLen or use shorter records")
        kept_per_dataset.append(kept)
        stats.per_dataset.append(len(kept))
    samples = mix(kept_per_dataset, [ref.weight for ref in spec.data], training.seed)
    stats.samples = len(samples)
    return samples, stats
