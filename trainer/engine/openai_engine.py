"""OpenAI-compatible backend (vLLM serve, SGLang, hosted APIs) over aiohttp chat completions.

- The API key comes from the environment variable ``BRANCHMERGE_API_KEY`` (the control plane fills it from
  ``endpoint.apiKeySecretRef``); it is sent as a bearer token and never logged or put in an error.
- One HTTP request per sample (``n = 1``, seed ``request seed + sample index``): many hosted APIs reject
  ``n > 1``, and per-sample requests retry independently.
- At most ``endpoint.maxConcurrency`` requests in flight; 429, 5xx, timeouts and connection errors are retried
  with exponential backoff and full jitter, honouring ``Retry-After``; other 4xx fail at once.
- Reasoning servers that return the thinking separately (``reasoning_content``/``reasoning``) get it folded
  back as ``<think>...</think>``, and a ``reasoning</think>answer`` reply (the server's template opened the
  block in the prompt) gets its opening tag back, so traces look the same as from an offline engine
  (``chat.join_reasoning``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import os
import random
import time
from typing import Any

from ...api.common import Engine, Sampling
from ..errors import InvalidInput, Retryable
from .base import Completion, Conversation, ProgressCallback, TextEngine
from .chat import join_reasoning

API_KEY_ENV = "BRANCHMERGE_API_KEY"
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 300.0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, min(float(value), MAX_RETRY_AFTER))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when - time.time(), MAX_RETRY_AFTER))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform(0, min(cap, base * 2**attempt))."""
    return rng.uniform(0, min(cap, base * (2 ** attempt)))


class _Transient(Exception):
    def __init__(self, what: str, retry_after: float | None = None):
        super().__init__(what)
        self.retry_after = retry_after


class OpenAIEngine(TextEngine):
    backend = "openai"
    backoff_base = 0.5  # seconds; tests lower these
    backoff_cap = 60.0

    def __init__(self, engine: Engine, system_prompt: str | None = None):
        super().__init__(system_prompt)
        if engine.endpoint is None:
            raise InvalidInput("teacher.engine.endpoint: required by the openai engine")
        self.endpoint = engine.endpoint
        self.url = self.endpoint.base_url.rstrip("/") + "/chat/completions"
        self._api_key = os.environ.get(API_KEY_ENV) or None
        self.requests_sent = 0
        self.retries = 0
        self._rng = random.Random()

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIEngine(url={self.url!r}, model={self.endpoint.model!r})"

    # ---- public sync entry --------------------------------------------------------------------------
    def _generate(self, conversations: list[Conversation], sampling: Sampling, n: int, seeds: list[int],
                  on_progress: ProgressCallback | None) -> list[list[Completion]]:
        coro_factory = lambda: self._generate_async(conversations, sampling, n, seeds, on_progress)  # noqa: E731
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro_factory())
        # called from inside an event loop (e.g. an async caller): run on a private loop in a thread
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: asyncio.run(coro_factory())).result()

    # ---- async core ---------------------------------------------------------------------------------
    def _body(self, conversation: Conversation, sampling: Sampling, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.endpoint.model, "messages": conversation,
                                "temperature": sampling.temperature, "top_p": sampling.top_p,
                                "max_tokens": sampling.max_tokens, "seed": seed, "n": 1}
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k  # vLLM/SGLang extension
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        return body

    async def _generate_async(self, conversations, sampling, n, seeds, on_progress):
        import aiohttp

        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        limit = asyncio.Semaphore(self.endpoint.max_concurrency)
        total = len(conversations) * n
        done = 0
        results: list[list[Completion | None]] = [[None] * n for _ in conversations]
        timeout = aiohttp.ClientTimeout(total=self.endpoint.timeout_seconds)
        connector = aiohttp.TCPConnector(limit=self.endpoint.max_concurrency)

        async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
            async def one(i: int, j: int) -> None:
                nonlocal done
                body = self._body(conversations[i], sampling, (seeds[i] + j) & 0x7FFFFFFF)
                async with limit:
                    results[i][j] = await self._request(session, body)
                done += 1
                if on_progress:
                    on_progress(done, total)

            tasks = [asyncio.ensure_future(one(i, j)) for i in range(len(conversations)) for j in range(n)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
        return results  # type: ignore[return-value]

    async def _request(self, session, body: dict) -> Completion:
        import aiohttp

        last = ""
        for attempt in range(self.endpoint.max_retries + 1):
            if attempt:
                self.retries += 1
            try:
                return await self._post(session, body)
            except _Transient as err:
                last = str(err)
                wait = err.retry_after
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                last = f"{type(err).__name__}"
                wait = None
            if attempt == self.endpoint.max_retries:
                break
            if wait is None:
                wait = backoff_delay(attempt, self.backoff_base, self.backoff_cap, self._rng)
            await asyncio.sleep(wait)
        raise Retryable(f"openai engine: {self.url}: giving up after {self.endpoint.max_retries + 1} attempts "
                        f"(last: {last})")

    async def _post(self, session, body: dict) -> Completion:
        self.requests_sent += 1
        async with session.post(self.url, json=body) as resp:
            if resp.status in RETRY_STATUSES:
                raise _Transient(f"HTTP {resp.status}", parse_retry_after(resp.headers.get("Retry-After")))
            if resp.status != 200:
                detail = (await resp.text())[:300].replace("\n", " ")
                raise InvalidInput(f"openai engine: {self.url}: HTTP {resp.status}: {detail}")
            data = await resp.json(content_type=None)
        try:
            choice = data["choices"][0]
            message = choice["message"]
            text = join_reasoning(message.get("content") or "",
                                  message.get("reasoning_content") or message.get("reasoning"),
                                  truncated=choice.get("finish_reason") == "length")
        except (KeyError, IndexError, TypeError):
            raise _Transient("malformed response (no choices[0].message)") from None
        usage = data.get("usage") or {}
        tokens = usage.get("completion_tokens")
        if not isinstance(tokens, int):
            tokens = (len(text) + 3) // 4  # estimate when the server reports no usage
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(text=text, token_ids=None, num_tokens=tokens, finish_reason=reason)
