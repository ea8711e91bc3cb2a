"""Render conversations to prompt token ids with the model's chat template (or the spec's override).

Offline backends tokenize here, once, with the Hugging Face tokenizer: the ids sent to the model are exactly
what the template produces (no second BOS, no server-side template drift), and tests can reproduce them.

Think tags: some templates open the reasoning block in the generation prompt (R1-Distill's ends
``<｜Assistant｜><think>\\n``), so the model's own text starts inside it and only closes ``</think>``. Every backend
returns teacher text that starts with the tag the prompt opened (``<think>\\nreasoning\\n</think>\\n\\nanswer``):
offline engines prepend the opened tail of the prompt (:func:`opened_think`, :func:`with_opened_think`), the
OpenAI engine folds a separate reasoning field back in or restores the missing opening tag. The extra text is
not in ``Completion.token_ids`` / ``num_tokens`` (the model did not generate it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Conversation

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a rendered prompt."""
    # the template already holds every special token it wants (BOS included when the model uses one)
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def prompt_token_ids(tokenizer: Any, conversation: Conversation) -> list[int]:
    """Token ids of the templated conversation, ending with the open assistant turn."""
    return prompt_ids(tokenizer, render_prompt(tokenizer, conversation))


def opened_think(prompt: str) -> str:
    """The think block a rendered prompt leaves open at its end (``"<think>\\n"`` for R1-Distill), else ``""``."""
    at = prompt.rfind(THINK_OPEN)
    if at < 0 or prompt[at + len(THINK_OPEN):].strip():
        return ""  # no tag, or something (a closing tag, text) follows it
    return prompt[at:]


def with_opened_think(text: str, opened: str) -> str:
    """Generated ``text`` as a trace: led by the think tag its prompt opened (unless it repeats the tag itself)."""
    if not opened or text.lstrip().startswith(THINK_OPEN):
        return text
    return opened + text


def join_reasoning(content: str, reasoning: str | None, truncated: bool = False) -> str:
    """Chat-completions output as the same trace text an offline engine gives.

    A server with a reasoning parser returns the thinking separately: it is folded back as
    ``<think>\\n...\\n</think>\\n\\n`` + content (no closing tag when the sample was cut off inside it). A server
    without one returns ``reasoning</think>answer`` when its template opened the block in the prompt: the opening
    tag is restored.
    """
    if reasoning and THINK_OPEN not in content:
        if truncated and not content.strip():
            return f"{THINK_OPEN}\n{reasoning.strip()}"
        return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{content.lstrip()}"
    close = content.find(THINK_CLOSE)
    if close >= 0 and THINK_OPEN not in content[:close]:
        return f"{THINK_OPEN}\n{content.lstrip()}"
    return content
