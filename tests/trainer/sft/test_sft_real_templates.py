"""Real chat-template structures: Qwen2.5's ChatML (default system prompt) and DeepSeek-R1-Distill-Qwen's.

Both templates are written (sft_helpers.py) as Jinja strings that reproduce the STRUCTURE of the published ones (not
copies): R1-Distill's ``<｜User｜>``/``<｜Assistant｜>`` markers, BOS, the system prompt hoisted to the front,
``<｜Assistant｜><think>\\n`` as its generation prompt, and ``</think>`` reasoning stripped from assistant turns.
They run on a tiny local tokenizer with those markers as special tokens (no hub).
"""
from __future__ import annotations

import json

from branchmerge.api.sft import BranchSFTSpec
from branchmerge.trainer.sft.chat import encode
from branchmerge.trainer.sft.dataset import build_samples
from tests.chat_templates import ASSISTANT, BOS, EOS, QWEN25_SYSTEM, QWEN25_TEMPLATE, USER

from .sft_helpers import RAW, REASONING, TRACE

# templates and the r1_tokenizer / qwen_tokenizer fixtures: tests/chat_templates.py and conftest.py (shared with
# test_sft_layouts.py)


def labelled(tok, enc) -> str:
    return tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != -100])


def unlabelled_prefix(tok, enc) -> str:
    first = next(i for i, x in enumerate(enc.labels) if x != -100)
    return tok.decode(enc.input_ids[:first])


def test_r1_generation_prompt_suffix_belongs_to_the_assistant_span(r1_tokenizer):
    messages = [{"role": "user", "content": "what is 2 + 3?"}, {"role": "assistant", "content": TRACE}]
    enc = encode(r1_tokenizer, messages)  # raised "not prefix-stable" before: <think>\n after the header
    prompt = r1_tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{BOS}{USER}what is 2 + 3?{ASSISTANT}<think>\n"
    # the training text is the inference prompt followed by what the model generated after it
    assert r1_tokenizer.decode(enc.input_ids) == prompt + RAW + EOS
    assert unlabelled_prefix(r1_tokenizer, enc) == f"{BOS}{USER}what is 2 + 3?{ASSISTANT}"
    assert labelled(r1_tokenizer, enc) == TRACE + EOS  # <think>\n included, reasoning kept


def test_r1_raw_offline_trace_without_the_opening_tag_trains_the_same(r1_tokenizer):
    user = {"role": "user", "content": "what is 2 + 3?"}
    with_tag = encode(r1_tokenizer, [user, {"role": "assistant", "content": TRACE}])
    raw = encode(r1_tokenizer, [user, {"role": "assistant", "content": RAW}])
    assert (raw.input_ids, raw.labels) == (with_tag.input_ids, with_tag.labels)
    # content that opens the tag in its own spelling is not doubled
    own = encode(r1_tokenizer, [user, {"role": "assistant", "content": "<think>5</think>5"}])
    assert labelled(r1_tokenizer, own) == "<think>5</think>5" + EOS


def test_r1_multi_turn_keeps_reasoning_the_template_strips(r1_tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "what is 2 + 3?"}, {"role": "assistant", "content": TRACE},
                {"role": "user", "content": "and 4 + 4?"},
                {"role": "assistant", "content": "<think>\n4+4=8\n</think>\n\n8"}]
    plain = r1_tokenizer.apply_chat_template(messages, tokenize=False)
    assert REASONING not in plain  # the template itself strips earlier reasoning
    enc = encode(r1_tokenizer, messages)
    text = r1_tokenizer.decode(enc.input_ids)
    assert text.startswith(f"{BOS}Be brief.{USER}what is 2 + 3?{ASSISTANT}<think>\n{REASONING}")
    assert labelled(r1_tokenizer, enc) == TRACE + EOS + "<think>\n4+4=8\n</think>\n\n8" + EOS
    assert f"{USER}and 4 + 4?{ASSISTANT}<think>\n4+4=8" in text


def test_qwen25_chatml_with_default_system_prompt(qwen_tokenizer):
    messages = [{"role": "user", "content": "what is 2 + 3?"}, {"role": "assistant", "content": TRACE},
                {"role": "user", "content": "and 4 + 4?"}, {"role": "assistant", "content": "8"}]
    enc = encode(qwen_tokenizer, messages)
    text = qwen_tokenizer.decode(enc.input_ids)
    assert text.startswith(f"<|im_start|>system\n{QWEN25_SYSTEM}<|im_end|>\n<|im_start|>user\nwhat is 2 + 3?")
    assert labelled(qwen_tokenizer, enc) == TRACE + "<|im_end|>" + "8<|im_end|>"
    assert unlabelled_prefix(qwen_tokenizer, enc) == qwen_tokenizer.apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True)


PLAIN_CHATML = (  # ChatML without a default system prompt: a typical spec.chatTemplate override
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _resolve(ref, what):
    from branchmerge.api.uris import local_path

    return local_path(ref.uri)


def test_spec_chat_template_trains_but_the_base_template_is_published(tmp_path, qwen_tokenizer):
    """spec.chatTemplate renders the data; the published tokenizer (copied into merges) keeps the base's."""
    from branchmerge.trainer.sft.engine import load_tokenizer

    base = tmp_path / "base"
    qwen_tokenizer.save_pretrained(base)
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "what is 2 + 3?", "response": TRACE}) + "\n")
    spec = BranchSFTSpec.model_validate({"base": {"uri": base.as_uri()}, "chatTemplate": PLAIN_CHATML,
                                         "data": [{"uri": (tmp_path / "d.jsonl").as_uri()}]})
    tokenizer = load_tokenizer(base, spec)  # as train.py loads it
    samples, _ = build_samples(spec, tokenizer, _resolve)
    text = tokenizer.decode(samples[0].input_ids)
    # rendered with the spec's template (no default system prompt)
    assert text == f"<|im_start|>user\nwhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n{TRACE}<|im_end|>\n"
    tokenizer.save_pretrained(tmp_path / "published")  # as train.py publishes it
    published = (tmp_path / "published" / "chat_template.jinja").read_text()
    assert published == QWEN25_TEMPLATE
    # and a base with no template of its own publishes the spec's (nothing else to keep)
    bare = tmp_path / "bare"
    qwen_tokenizer.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink()
    tokenizer = load_tokenizer(bare, spec)
    build_samples(spec, tokenizer, _resolve)
    assert tokenizer.chat_template == PLAIN_CHATML
