"""Render conversations to prompt token ids with the model's chat template (or the spec's override).

Offline backends tokenize here, once, with the Hugging Face tokenizer: the ids sent to the model are exactly
what the template produces (no second BOS, no server-side template drift), and tests can reproduce them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Conversation


def load_tokenizer(model_path: Path, *, trust_remote_code: bool = False, chat_template: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_path}: the tokenizer has no chat template; set engine.chatTemplate")
    return tokenizer


def render_prompt(tokenizer: Any, conversation: Conversation) -> str:
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def prompt_token_ids(tokenizer: Any, conversation: Conversation) -> list[int]:
    """Token ids of the templated conversation, ending with the open assistant turn."""
    text = render_prompt(tokenizer, conversation)
    # the template already holds every special token it wants (BOS included when the model uses one)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
