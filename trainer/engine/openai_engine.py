"""OpenAI-compatible backend (vLLM serve, SGLang, hosted APIs) over aiohttp chat completions.

- The API key comes from the environment variable ``BRANCHMERGE_API_KEY`` (the control plane fills it from
  ``endpoint.apiKeySecretRef``); it is sent as a bearer token and never logged or put in an error (a server
  message quoting it gets it masked).
- One HTTP request per sample (``n = 1``, seed ``request seed + sample index``): many hosted APIs reject
  ``n > 1``, and per-sample requests retry independently.
- Streaming (``endpoint.stream``, the default): answers come as server-sent events, so a 32k-token trace
  that takes half an hour is never cut by a timeout while tokens keep arriving; ``endpoint.timeoutSeconds``
  is the longest silence allowed (the wait for the response and its first token included). Without
  streaming it is the timeout of the whole request. A server that answers a streaming request with one JSON
  response is read as such.
- At most ``endpoint.maxConcurrency`` requests in flight (``generate_iter``: a window of prompts worth twice
  that many samples is started, the next prompt as one finishes, each prompt yielded when its n are done);
  429, 408, 409, 425, 5xx, timeouts, connection errors, cut-off streams and malformed answers are retried
  (from scratch) with exponential backoff and full jitter, honouring ``Retry-After``, at most
  ``endpoint.maxRetries`` times; then the stage fails retryable.
- Any other 4xx concerns that one request (a prompt the server will not take, a parameter it refuses): the
  sample comes back *rejected* (``Completion.rejected = "http_<status>"``, ``Completion.error`` = status and
  the server's message, truncated) and the stage goes on, counting it. Configuration errors must still fail
  the stage (exit 2) instead of rejecting the whole dataset one sample at a time, so 401, 403 and 404 (bad
  key, no permission, wrong URL or model name) are counted while the endpoint has not accepted a request:
  when every request of the engine's first call has been refused that way -- or, for a big call, its first
  ``REFUSAL_LIMIT`` answers -- the call raises :class:`InvalidInput` naming the status and the message.
  Once a request is accepted (HTTP 200) the endpoint is known good; then only ``REFUSAL_LIMIT`` refusals
  with no acceptance in between (a key revoked mid-run) stop the stage. Committed batches are kept either way.
- Context length: when it is known (``engine.maxModelLen``, else the ``max_model_len`` that vLLM lists for the
  model on ``GET /models``), each request asks for ``min(sampling.maxTokens, maxModelLen - prompt tokens)``
  -- vLLM answers 400 to a request whose prompt plus ``max_tokens`` exceeds the context. Prompt tokens are
  counted exactly with the model's tokenizer and chat template when the engine has a local model folder
  (Eval with ``spec.model``), else bounded from above by the UTF-8 bytes of the messages plus a template
  allowance (a byte-level or byte-fallback tokenizer never makes more tokens than bytes): the answer may get
  less room than it could have (about three times the prompt's tokens for English), never too much. A prompt that leaves no room is rejected
  (``prompt_too_long``) without being sent; with the estimate, that includes a prompt whose bytes exceed the
  context length though its tokens would fit.
- Reasoning servers that return the thinking separately (``reasoning_content``/``reasoning``) get it folded
  back as ``<think>...</think>``, and a ``reasoning</think>answer`` reply (the server's template opened the
  block in the prompt) gets its opening tag back, so traces look the same as from an offline engine
  (``chat.join_reasoning``); streamed deltas are concatenated first, then folded the same way.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import itertools
import json
import os
import queue
import random
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from ...api.common import API_KEY_ENV, Engine, Sampling
from ..errors import InvalidInput, Retryable
from .base import Completion, Conversation, Finished, ProgressCallback, TextEngine
from .chat import join_reasoning
from .sse import SSEDecoder, StreamedAnswer, StreamError

RETRY_STATUSES = frozenset({408, 409, 425, 429})  # besides every 5xx
CONFIG_STATUSES = frozenset({401, 403, 404})  # refusals that usually mean a wrong key, URL or model
REFUSAL_LIMIT = 16  # config refusals with no acceptance in between that stop the stage
MAX_RETRY_AFTER = 300.0
DETAIL_CHARS = 300  # of a server's error message kept in a rejection
SIDE_TIMEOUT = 30.0  # seconds for small reads: GET /models (the context length), an error body
PROMPT_ALLOWANCE, MESSAGE_ALLOWANCE = 64, 8  # tokens a chat template may add (default system prompt, tags)
MAX_LOGGED_REJECTIONS = 20
_END = object()  # generate_iter's queue: the request loop has ended


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


def error_message(body: str) -> str:
    """The message of an error body: OpenAI's ``{"error": {"message"}}``, vLLM's ``{"message"}``, else the text."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        if doc.get("message"):
            return str(doc["message"])
    return body


def estimate_prompt_tokens(conversation: Conversation) -> int:
    """An upper bound of a conversation's prompt tokens without its tokenizer: one per UTF-8 byte of the
    messages, plus what a chat template may add."""
    size = sum(len(m["content"].encode()) + len(str(m["role"]).encode()) + MESSAGE_ALLOWANCE for m in conversation)
    return size + PROMPT_ALLOWANCE


def is_retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


class _Transient(Exception):
    """Worth another attempt."""

    def __init__(self, what: str, retry_after: float | None = None):
        super().__init__(what)
        self.retry_after = retry_after


class _Refused(Exception):
    """The server refused this request (a 4xx that retrying cannot change)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class OpenAIEngine(TextEngine):
    backend = "openai"
    backoff_base = 0.5  # seconds; tests lower these
    backoff_cap = 60.0

    def __init__(self, engine: Engine, system_prompt: str | None = None, model_path: Path | None = None):
        super().__init__(system_prompt)
        if engine.endpoint is None:
            raise InvalidInput("teacher.engine.endpoint: required by the openai engine")
        self.spec = engine
        self.endpoint = engine.endpoint
        self.base_url = self.endpoint.base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model_path = Path(model_path) if model_path is not None else None
        self.max_model_len = engine.max_model_len
        self._api_key = os.environ.get(API_KEY_ENV) or None
        self.requests_sent = 0
        self.retries = 0
        self.rejections: Counter = Counter()  # rejected samples by code
        self._rng = random.Random()
        self._looked_up_len = engine.max_model_len is not None
        self._tokenizer: Any = None
        self._tokenizer_tried = False
        self._accepted = False  # the endpoint has answered a request with 200
        self._refusals = 0  # 401/403/404 since the last 200 (or since the start)

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

    def _generate_iter(self, conversations: list[Conversation], sampling: Sampling, n: int, seeds: list[int],
                       window: int | None, tick: float | None) -> Iterator[Finished | None]:
        """Requests run on a private event loop in a thread; finished prompts come back through a queue, so
        requests keep going while the caller verifies and commits. Closing the iterator cancels the rest."""
        finished: queue.Queue = queue.Queue()
        stop = threading.Event()
        window = window or self.default_window(n)

        def run() -> None:
            try:
                asyncio.run(self._stream_async(conversations, sampling, n, seeds, window, finished.put, stop))
            except BaseException as err:  # noqa: BLE001 -- handed to the caller's thread, raised there
                finished.put(err)
            finally:
                finished.put(_END)

        thread = threading.Thread(target=run, name="openai-engine", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    item = finished.get(timeout=tick)
                except queue.Empty:
                    yield None
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def default_window(self, n: int) -> int:
        """Prompts in flight: enough samples for twice ``maxConcurrency``, so a finished request's slot is
        taken at once by a request already waiting (more would only hold prompts that nobody commits)."""
        return max(1, -(-2 * self.endpoint.max_concurrency // n))

    async def _stream_async(self, conversations, sampling, n, seeds, window, emit, stop) -> None:
        """Keep ``window`` prompts going; ``emit((index, completions))`` each one once its n samples are done."""
        limit = asyncio.Semaphore(self.endpoint.max_concurrency)
        async with self._session() as session:
            if not self._looked_up_len:
                await self._look_up_max_model_len(session)
            budgets = self._budgets(conversations, sampling.max_tokens)
            to_send = sum(n for b in budgets if isinstance(b, int))

            async def sample(i: int, j: int) -> Completion:
                budget = budgets[i]
                if isinstance(budget, tuple):
                    return self._reject(*budget)
                body = self._body(conversations[i], sampling, (seeds[i] + j) & 0x7FFFFFFF, budget)
                async with limit:
                    return await self._request(session, body, to_send)

            async def prompt(i: int) -> Finished:
                return i, list(await asyncio.gather(*(sample(i, j) for j in range(n))))

            todo = iter(range(len(conversations)))
            running: set = set()
            try:
                while not stop.is_set():
                    running.update(asyncio.ensure_future(prompt(i))
                                   for i in itertools.islice(todo, window - len(running)))
                    if not running:
                        return
                    # the timeout only lets a closed iterator (stop) be noticed while requests run
                    done, running = await asyncio.wait(running, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        emit(task.result())  # a failed prompt raises here and ends the call
            finally:
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)

    # ---- request bodies and the context budget ------------------------------------------------------
    def _body(self, conversation: Conversation, sampling: Sampling, seed: int, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.endpoint.model, "messages": conversation,
                                "temperature": sampling.temperature, "top_p": sampling.top_p,
                                "max_tokens": max_tokens, "seed": seed, "n": 1}
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k  # vLLM/SGLang extension
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if self.endpoint.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}  # completion_tokens in the last chunk
        return body

    def _budget(self, conversation: Conversation, max_tokens: int) -> int | tuple[str, str]:
        """``max_tokens`` to ask for, or a rejection ``(code, detail)`` when the prompt leaves no room."""
        if self.max_model_len is None:
            return max_tokens
        prompt, exact = self._prompt_tokens(conversation)
        room = self.max_model_len - prompt
        if room >= 1:
            return min(max_tokens, room)
        counted = f"{prompt} tokens" if exact else f"up to {prompt} tokens (estimated: no local tokenizer)"
        return "prompt_too_long", f"the prompt has {counted}; the context length is {self.max_model_len}"

    def _budgets(self, conversations: list[Conversation], max_tokens: int) -> list[int | tuple[str, str]]:
        """One budget per conversation; repeats (Eval's k samples of a question) are counted once."""
        seen: dict[str, int | tuple[str, str]] = {}
        out = []
        for conversation in conversations:
            key = json.dumps(conversation, sort_keys=True, ensure_ascii=False)
            if key not in seen:
                seen[key] = self._budget(conversation, max_tokens)
            out.append(seen[key])
        return out

    def _prompt_tokens(self, conversation: Conversation) -> tuple[int, bool]:
        """(prompt tokens, exact?): counted with the model's chat template when a tokenizer is at hand."""
        tokenizer = self._local_tokenizer()
        if tokenizer is None:
            return estimate_prompt_tokens(conversation), False
        from .chat import prompt_token_ids

        return len(prompt_token_ids(tokenizer, conversation)), True

    def _local_tokenizer(self) -> Any:
        if self._tokenizer_tried:
            return self._tokenizer
        self._tokenizer_tried = True
        if self.model_path is None or not self.model_path.is_dir():
            return None
        try:
            from .chat import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_path, trust_remote_code=self.spec.trust_remote_code,
                                             chat_template=self.spec.chat_template)
        except Exception as err:  # counting falls back to the estimate; generation does not need it
            print(f"openai engine: no tokenizer from {self.model_path} ({type(err).__name__}: {err}); "
                  f"prompt tokens are estimated", file=sys.stderr)
        return self._tokenizer

    async def _look_up_max_model_len(self, session) -> None:
        """vLLM lists each model's context length on GET /models; hosted APIs do not (then: no cap)."""
        import aiohttp

        self._looked_up_len = True
        try:
            timeout = aiohttp.ClientTimeout(total=min(self.endpoint.timeout_seconds, SIDE_TIMEOUT))
            async with session.get(self.base_url + "/models", timeout=timeout) as resp:
                if resp.status != 200:
                    return
                doc = await resp.json(content_type=None)
            found = [m.get("max_model_len") for m in doc.get("data") or []
                     if isinstance(m, dict) and m.get("id") == self.endpoint.model]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            return
        if found and isinstance(found[0], int) and not isinstance(found[0], bool) and found[0] > 0:
            self.max_model_len = found[0]
            print(f"openai engine: the server's context length for {self.endpoint.model!r} is {found[0]} tokens; "
                  f"max_tokens is capped to what fits", file=sys.stderr)

    # ---- async core ---------------------------------------------------------------------------------
    def _session(self):
        import aiohttp

        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if self.endpoint.stream:  # no cap on the whole answer: silence is bounded in _idle
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.endpoint.timeout_seconds)
        else:
            timeout = aiohttp.ClientTimeout(total=self.endpoint.timeout_seconds)
        connector = aiohttp.TCPConnector(limit=self.endpoint.max_concurrency)
        return aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)

    async def _generate_async(self, conversations, sampling, n, seeds, on_progress):
        limit = asyncio.Semaphore(self.endpoint.max_concurrency)
        total = len(conversations) * n
        done = 0
        results: list[list[Completion | None]] = [[None] * n for _ in conversations]

        async with self._session() as session:
            if not self._looked_up_len:
                await self._look_up_max_model_len(session)
            budgets = self._budgets(conversations, sampling.max_tokens)
            to_send = sum(n for b in budgets if isinstance(b, int))

            async def one(i: int, j: int) -> None:
                nonlocal done
                budget = budgets[i]
                if isinstance(budget, tuple):
                    results[i][j] = self._reject(*budget)
                else:
                    body = self._body(conversations[i], sampling, (seeds[i] + j) & 0x7FFFFFFF, budget)
                    async with limit:
                        results[i][j] = await self._request(session, body, to_send)
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

    async def _request(self, session, body: dict, call_requests: int) -> Completion:
        """One sample: retried on transient failures, rejected on a refusal."""
        import aiohttp

        last = ""
        for attempt in range(self.endpoint.max_retries + 1):
            if attempt:
                self.retries += 1
            try:
                return await self._post(session, body)
            except _Refused as err:
                return self._refused(err, call_requests)
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

    async def _idle(self, awaitable):
        """``awaitable`` within the idle timeout (streaming): silence that long is a transient failure."""
        try:
            return await asyncio.wait_for(awaitable, self.endpoint.timeout_seconds)
        except asyncio.TimeoutError:
            raise _Transient(f"TimeoutError: no data for {self.endpoint.timeout_seconds:g} s") from None

    async def _post(self, session, body: dict) -> Completion:
        self.requests_sent += 1

        async def send():
            return await session.post(self.url, json=body)

        resp = await (self._idle(send()) if self.endpoint.stream else send())
        async with resp:
            await self._check_status(resp)
            self._accepted, self._refusals = True, 0
            if resp.content_type == "text/event-stream":
                return await self._read_stream(resp)
            raw = await (self._idle(resp.read()) if self.endpoint.stream else resp.read())
        try:
            data = json.loads(raw)
        except ValueError:
            raise _Transient("malformed response (not JSON)") from None
        return self._from_message(data)

    async def _check_status(self, resp) -> None:
        if resp.status == 200:
            return
        if is_retryable_status(resp.status):
            raise _Transient(f"HTTP {resp.status}", parse_retry_after(resp.headers.get("Retry-After")))
        try:
            raw = await asyncio.wait_for(resp.content.read(16384), SIDE_TIMEOUT)
        except (asyncio.TimeoutError, OSError):
            raw = b""
        detail = self._detail(raw.decode("utf-8", errors="replace"))
        if 400 <= resp.status < 500:
            raise _Refused(resp.status, detail)
        raise _Transient(f"HTTP {resp.status}: {detail}")  # 1xx/2xx/3xx other than a plain 200

    def _detail(self, body: str) -> str:
        """A server's error message for a log line: one line, truncated, the key masked."""
        text = re.sub(r"\s+", " ", error_message(body)).strip()
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text[:DETAIL_CHARS] + ("..." if len(text) > DETAIL_CHARS else "")

    # ---- answers ------------------------------------------------------------------------------------
    async def _read_stream(self, resp) -> Completion:
        decoder, answer = SSEDecoder(), StreamedAnswer()
        while not answer.done:
            chunk = await self._idle(resp.content.readany())
            for payload in decoder.feed(chunk) if chunk else decoder.close():
                self._fold(answer, payload)
            if not chunk:
                break
        if not (answer.finished or answer.done):
            raise _Transient("the stream ended before the answer finished")
        content, reasoning = answer.text()
        return self._completion(content, reasoning, answer.finish_reason, answer.usage)

    def _fold(self, answer: StreamedAnswer, payload: str) -> None:
        try:
            answer.add(payload)
        except StreamError as err:  # an error event after the 200: classified like a status
            detail = self._detail(str(err))
            if err.status is not None and 400 <= err.status < 500 and not is_retryable_status(err.status):
                raise _Refused(err.status, detail) from None
            raise _Transient(f"error event in the stream: {detail}") from None
        except (ValueError, TypeError, AttributeError):
            raise _Transient("malformed stream event") from None

    def _from_message(self, data: Any) -> Completion:
        try:
            choice = data["choices"][0]
            message = choice["message"]
            content = message.get("content") or ""
            reasoning = message.get("reasoning_content") or message.get("reasoning")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise _Transient("malformed response (no choices[0].message)") from None
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        return self._completion(content, reasoning, choice.get("finish_reason"), usage)

    @staticmethod
    def _completion(content: str, reasoning: str | None, finish: str | None, usage: dict | None) -> Completion:
        truncated = finish == "length"
        text = join_reasoning(content, reasoning, truncated=truncated)
        tokens = (usage or {}).get("completion_tokens")
        if not isinstance(tokens, int):
            tokens = (len(text) + 3) // 4  # estimate when the server reports no usage
        return Completion(text=text, token_ids=None, num_tokens=tokens,
                          finish_reason="length" if truncated else "stop")

    # ---- rejections ---------------------------------------------------------------------------------
    def _refused(self, err: _Refused, call_requests: int) -> Completion:
        """A refused request rejects its sample -- unless refusals show the endpoint itself is wrong."""
        if err.status in CONFIG_STATUSES:
            self._refusals += 1
            needed = REFUSAL_LIMIT if self._accepted else min(REFUSAL_LIMIT, call_requests)
            if self._refusals >= needed:
                how = ("in a row since the last accepted one" if self._accepted
                       else "and none accepted yet")
                raise InvalidInput(
                    f"openai engine: {self.url}: HTTP {err.status}: {err.detail} ({self._refusals} requests refused "
                    f"{how}; check endpoint.baseUrl, endpoint.model and the API key in endpoint.apiKeySecretRef)")
        return self._reject(f"http_{err.status}", f"HTTP {err.status}: {err.detail}")

    def _reject(self, code: str, detail: str) -> Completion:
        self.rejections[code] += 1
        count = sum(self.rejections.values())
        if count <= MAX_LOGGED_REJECTIONS:
            more = " (later rejections are only counted)" if count == MAX_LOGGED_REJECTIONS else ""
            print(f"openai engine: sample rejected ({code}): {detail}{more}", file=sys.stderr)
        return Completion(text="", token_ids=None, num_tokens=0, finish_reason="rejected", rejected=code,
                          error=detail)
