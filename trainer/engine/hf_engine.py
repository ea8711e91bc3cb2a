"""Transformers backend: a slow but dependable fallback (CPU, tests, models vLLM cannot load).

One request at a time (no padding effects), ``num_return_sequences = n``, torch seeded per request so the
same prompt gives the same samples wherever it lands. Stop strings end the text (and are cut, as vLLM does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...api.common import Engine, Sampling
from .base import Completion, Conversation, ProgressCallback, TextEngine
from .chat import load_tokenizer, opened_think, prompt_ids, render_prompt, with_opened_think

_DTYPES = {"auto": "auto", "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


class TransformersEngine(TextEngine):
    backend = "transformers"

    def __init__(self, engine: Engine, model_path: Path, system_prompt: str | None = None):
        super().__init__(system_prompt)
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=engine.trust_remote_code,
                                        chat_template=engine.chat_template)
        dtype: Any = _DTYPES[engine.dtype]
        if dtype != "auto":
            dtype = getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype,
                                                          trust_remote_code=engine.trust_remote_code)
        self.model.eval()
        self.max_model_len = engine.max_model_len or getattr(self.model.config, "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = eos

    def _one(self, prompt: str, sampling: Sampling, n: int, seed: int) -> list[Completion]:
        torch = self.torch
        ids = prompt_ids(self.tokenizer, prompt)
        max_new = sampling.max_tokens
        if self.max_model_len:
            max_new = max(0, min(max_new, self.max_model_len - len(ids)))
        if max_new == 0:
            return [Completion("", [], 0, "length") for _ in range(n)]
        sample = sampling.temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new, do_sample=sample, num_return_sequences=n,
                                      eos_token_id=self.eos_ids or None, pad_token_id=(self.eos_ids or [0])[0])
        if sample:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k if sampling.top_k > 0 else 0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      **kwargs)
        completions = []
        opened = opened_think(prompt)  # R1-Distill's prompt opens <think>: traces start with it
        for row in out[:, len(ids):].tolist():
            c = self._finish(row, sampling, max_new)
            c.text = with_opened_think(c.text, opened)
            completions.append(c)
        return completions

    def _finish(self, row: list[int], sampling: Sampling, max_new: int) -> Completion:
        tokens: list[int] = []
        hit_eos = False
        for tok in row:
            tokens.append(tok)
            if tok in self.eos_ids:
                hit_eos = True
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in sampling.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, hit_eos = text[:cut], True
        reason = "stop" if hit_eos or len(tokens) < max_new else "length"
        return Completion(text=text, token_ids=tokens, num_tokens=len(tokens), finish_reason=reason)

    def _generate(self, conversations: list[Conversation], sampling: Sampling, n: int, seeds: list[int],
                  on_progress: ProgressCallback | None) -> list[list[Completion]]:
        results = []
        for i, (conv, seed) in enumerate(zip(conversations, seeds)):
            results.append(self._one(render_prompt(self.tokenizer, conv), sampling, n, seed))
            if on_progress:
                on_progress(i + 1, len(conversations))
        return results

    def close(self) -> None:
        self.model = None
