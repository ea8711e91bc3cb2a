"""The engine interface shared by TeacherGen and Eval: chat conversations in, n completions each out.

Every backend (offline vLLM, an OpenAI-compatible endpoint, transformers on CPU) answers
``generate(conversations, sampling, n)`` with one list of ``n`` :class:`Completion` per conversation, in order;
``generate_iter`` gives the same completions per conversation as each finishes (a bounded window in flight).
Seeds are derived per request from ``sampling.seed`` and the conversation itself (not its position in the call),
so the same prompt gets the same samples however the prompts are batched, sharded or resumed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

from ...api.common import Sampling

Conversation = list[dict]
ProgressCallback = Callable[[int, int], None]  # (requests done, requests total)
FinishReason = Literal["stop", "length", "rejected"]


@dataclass
class Completion:
    text: str
    token_ids: list[int] | None
    num_tokens: int
    finish_reason: FinishReason
    rejected: str | None = None
    """Why the engine gave no text for this sample (a stable code such as ``http_400`` or
    ``prompt_too_long``); the sample counts as rejected, the stage goes on."""
    error: str | None = None
    """The rejection's detail: the status and the server's message (truncated), or what did not fit."""

    @property
    def truncated(self) -> bool:
        """The sample hit max_tokens (or the context length) before it finished."""
        return self.finish_reason == "length"


Finished = tuple[int, list[Completion]]  # (conversation index, its n completions) from generate_iter


class EngineError(RuntimeError):
    """A backend failed in a way the caller should report (message never holds secrets)."""


def request_seed(base_seed: int, conversation: Conversation) -> int:
    """A 31-bit seed from the base seed and the conversation's content (stable across processes)."""
    blob = json.dumps([int(base_seed), conversation], sort_keys=True, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") & 0x7FFFFFFF


def with_system_prompt(conversation: Conversation, system_prompt: str | None) -> Conversation:
    """Prepend the engine's system prompt unless the conversation already opens with one."""
    if not system_prompt or (conversation and conversation[0].get("role") == "system"):
        return list(conversation)
    return [{"role": "system", "content": system_prompt}, *conversation]


def check_conversations(conversations: Sequence[Conversation]) -> None:
    for i, conv in enumerate(conversations):
        if not isinstance(conv, (list, tuple)) or not conv:
            raise ValueError(f"conversation {i}: expected a non-empty list of messages")
        for msg in conv:
            if not isinstance(msg, dict) or "role" not in msg or not isinstance(msg.get("content"), str):
                raise ValueError(f"conversation {i}: each message needs a role and a string content")


class TextEngine:
    """Base class of the backends. Use as a context manager or call ``close()``."""

    backend = "base"

    def __init__(self, system_prompt: str | None = None):
        self.system_prompt = system_prompt

    def generate(self, conversations: list[Conversation], sampling: Sampling, n: int = 1,
                 on_progress: ProgressCallback | None = None,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """n completions per conversation, in input order. ``seeds`` overrides the derived per-request seeds."""
        full, seeds = self._prepare(conversations, sampling, n, seeds)
        if not full:
            return []
        return self._generate(full, sampling, n, seeds, on_progress)

    def generate_iter(self, conversations: list[Conversation], sampling: Sampling, n: int = 1,
                      seeds: Sequence[int] | None = None, window: int | None = None,
                      tick: float | None = None) -> Iterator[Finished | None]:
        """Like :meth:`generate`, but yields ``(index, n completions)`` for each conversation as soon as all of
        its samples are done, in completion order, so a caller can commit while slower prompts still run.
        ``window``: at most that many conversations in flight (the backend's default when None); new ones go
        in as old ones finish. ``tick``: also yield ``None`` when that many seconds pass with nothing finished
        (lets a caller act on time while only stragglers remain). Same completions as ``generate``."""
        full, seeds = self._prepare(conversations, sampling, n, seeds)
        if window is not None and window < 1:
            raise ValueError("window must be >= 1")
        if not full:
            return iter(())
        return self._generate_iter(full, sampling, n, seeds, window, tick)

    def _prepare(self, conversations: list[Conversation], sampling: Sampling, n: int,
                 seeds: Sequence[int] | None) -> tuple[list[Conversation], list[int]]:
        check_conversations(conversations)
        if n < 1:
            raise ValueError("n must be >= 1")
        if seeds is not None and len(seeds) != len(conversations):
            raise ValueError("seeds must have one entry per conversation")
        full = [with_system_prompt(c, self.system_prompt) for c in conversations]
        if seeds is None:
            seeds = [request_seed(sampling.seed, c) for c in full]
        return full, list(seeds)

    def _generate_iter(self, conversations: list[Conversation], sampling: Sampling, n: int, seeds: list[int],
                       window: int | None, tick: float | None) -> Iterator[Finished | None]:
        """Fallback for backends without a step-wise API: windows of whole calls, yielded in order."""
        size = window or len(conversations)
        for start in range(0, len(conversations), size):
            outputs = self._generate(conversations[start:start + size], sampling, n, seeds[start:start + size], None)
            yield from enumerate(outputs, start)

    def _generate(self, conversations: list[Conversation], sampling: Sampling, n: int, seeds: list[int],
                  on_progress: ProgressCallback | None) -> list[list[Completion]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "TextEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
