"""Text generation engines shared by TeacherGen and Eval.

``open_engine(spec.engine, model_path, system_prompt=...)`` returns a :class:`TextEngine` (a context manager)
whose ``generate(conversations, sampling, n)`` gives one list of ``n`` :class:`Completion` per conversation.
Backends: ``vllm`` (offline), ``openai`` (an OpenAI-compatible endpoint; key in ``$BRANCHMERGE_API_KEY``),
``transformers`` (CPU fallback).
"""
from __future__ import annotations

from pathlib import Path

from ...api.common import Engine
from ..errors import InvalidInput
from .base import Completion, EngineError, TextEngine, request_seed, with_system_prompt

__all__ = ["Completion", "EngineError", "TextEngine", "open_engine", "request_seed",
           "with_system_prompt"]


def open_engine(engine: Engine, model_path: Path | None, *, system_prompt: str | None = None) -> TextEngine:
    """Start the backend named by ``engine.name`` (vLLM starts in ~30 s on CPU: open it once)."""
    if engine.name == "openai":
        from .openai_engine import OpenAIEngine

        return OpenAIEngine(engine, system_prompt=system_prompt, model_path=model_path)  # a tokenizer, if local
    if model_path is None:
        raise InvalidInput(f"engine {engine.name}: a local model path is required")
    model_path = Path(model_path)
    if not (model_path / "config.json").exists():
        raise InvalidInput(f"engine {engine.name}: {model_path} is not a model folder (no config.json)")
    if engine.name == "vllm":
        from .vllm_engine import VllmEngine

        return VllmEngine(engine, model_path, system_prompt=system_prompt)
    if engine.name == "transformers":
        from .hf_engine import TransformersEngine

        return TransformersEngine(engine, model_path, system_prompt=system_prompt)
    raise InvalidInput(f"engine.name: unknown engine {engine.name!r}")
