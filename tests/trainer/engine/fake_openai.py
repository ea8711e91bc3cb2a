"""A local OpenAI-compatible chat-completions server (aiohttp in a thread) for engine and stage tests.

What it does as vLLM serve does:
- ``POST /v1/chat/completions``: with ``"stream": true`` the answer is a ``text/event-stream`` of
  ``chat.completion.chunk`` events (a role chunk, then ``reasoning_content``/``reasoning`` deltas, then
  ``content`` deltas, a chunk with the finish reason, a usage chunk when ``stream_options.include_usage``,
  then ``data: [DONE]``); otherwise one ``chat.completion`` JSON. Headers go out before the first token.
- Errors are plain JSON with the HTTP status, before any event: ``{"error": {"message", "type", "code"}}``.
- With ``max_model_len`` set, a request whose prompt tokens plus ``max_tokens`` exceed it gets vLLM's 400
  ("This model's maximum context length is ..."); ``GET /v1/models`` lists the model with its
  ``max_model_len`` (404 when it is not set, as a server without the route).

Scripted behaviour: ``fail_plan`` (statuses served first, e.g. 429 with Retry-After), ``status_override``
(every request, e.g. 401), ``refuse`` (a status and message for chosen bodies, e.g. 400 for one prompt),
``delay`` (silence before the response headers), ``chunk_delay`` (between events: a slow but live stream),
``stall_plan`` (silence after the first event, one entry per request: a stuck stream), ``ignore_stream``,
``hold`` (chosen bodies wait, unanswered, until ``released`` is set: a prompt much slower than the rest).

What it does not emulate: real tokenization (prompt tokens are whitespace words plus a few per message,
always fewer than the engine's byte-based bound; an answer's tokens are its ``:``-separated parts), answers
cut by ``max_tokens`` (the finish reason is ``length`` when ``max_tokens < 5``, the text stays whole),
``n > 1``, logprobs, tools, keep-alive comments, mid-stream error events, prefill time that grows with the
prompt, TLS and HTTP/2.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Callable, Iterator

from aiohttp import web

MODEL = "teacher"


def prompt_tokens(messages: list[dict]) -> int:
    """The fake's tokenizer: words plus 4 per message (a template's tags) plus 2."""
    return sum(len(m["content"].split()) + 4 for m in messages) + 2


def pieces(text: str | None, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] if text else []


def error_body(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "BadRequestError", "code": status}},
                             status=status)


class FakeServer:
    """Chat completions that echo the prompt; scripted failures; records what it saw."""

    def __init__(self):
        self.requests: list[dict] = []  # bodies answered 200
        self.refused: list[tuple[int, dict]] = []  # (status, body) answered with a 4xx by refuse/max_model_len
        self.auth: list[str | None] = []
        self.fail_plan: list[tuple[int, dict]] = []  # (status, headers) served before real answers
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.chunk_delay = 0.0
        self.chunk_chars = 3
        self.stall_plan: list[float] = []
        self.status_override: int | None = None
        self.status_message = "bad model"
        self.refuse: Callable[[dict], tuple[int, str] | None] | None = None
        self.max_model_len: int | None = None
        self.ignore_stream = False  # answer streaming requests with one JSON response, as some servers do
        self.reasoning = False
        self.answer: Callable[[dict], str] | None = None  # body -> content, replaces the echo
        self.message: Callable[[dict], dict] | None = None  # body -> the whole message (reasoning fields too)
        self.hold: Callable[[dict], bool] | None = None  # bodies that get no answer until `released` is set
        self.released = threading.Event()
        self.held = 0  # requests waiting in `hold` now

    # ---- routes -----------------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        if self.max_model_len is None:
            raise web.HTTPNotFound()
        return web.json_response({"object": "list", "data": [
            {"id": MODEL, "object": "model", "owned_by": "vllm", "max_model_len": self.max_model_len}]})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.auth.append(request.headers.get("Authorization"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.hold and self.hold(body):
                await self._held()
            if self.status_override:
                return error_body(self.status_override, self.status_message)
            if self.fail_plan:
                status, headers = self.fail_plan.pop(0)
                return web.json_response({"error": "busy"}, status=status, headers=headers)
            refusal = self._refusal(body)
            if refusal:
                self.refused.append((refusal[0], body))
                return error_body(*refusal)
            self.requests.append(body)
            message, finish, tokens = self._answer(body)
            if body.get("stream") and not self.ignore_stream:
                return await self._stream(request, body, message, finish, tokens)
            return web.json_response({"object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                                      "usage": {"completion_tokens": tokens}})
        finally:
            self.in_flight -= 1

    async def _held(self) -> None:
        """A slow request (a long trace): no headers until the test sets ``released``."""
        self.held += 1
        try:
            while not self.released.is_set():
                await asyncio.sleep(0.01)
        finally:
            self.held -= 1

    # ---- answers ----------------------------------------------------------------------------------------
    def _refusal(self, body: dict) -> tuple[int, str] | None:
        if self.refuse and (scripted := self.refuse(body)):
            return scripted
        if self.max_model_len is not None:
            prompt, wanted = prompt_tokens(body["messages"]), body["max_tokens"]
            if prompt + wanted > self.max_model_len:
                return 400, (f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {prompt + wanted} tokens ({prompt} in the messages, {wanted} in the "
                             f"completion). Please reduce the length of the messages or completion.")
        return None

    def _answer(self, body: dict) -> tuple[dict, str, int]:
        prompt = body["messages"][-1]["content"]
        text = self.answer(body) if self.answer else f"echo:{prompt}:seed={body['seed']}"
        finish = "length" if body["max_tokens"] < 5 else "stop"
        message = {"role": "assistant", "content": text}
        if self.reasoning:
            message = {"role": "assistant", "content": "\\boxed{4}", "reasoning_content": "2+2 is 4"}
        if self.message:
            message = self.message(body)
        return message, finish, len(text.split(":"))

    async def _stream(self, request, body, message, finish, tokens) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)  # headers now, as vLLM does before the first token
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body["model"]}

        async def event(choices: list, **extra) -> None:
            await resp.write(f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n".encode())

        def delta(fields: dict, reason: str | None = None) -> list:
            return [{"index": 0, "delta": fields, "finish_reason": reason}]

        await event(delta({"role": "assistant", "content": ""}))
        stall = self.stall_plan.pop(0) if self.stall_plan else 0.0
        if stall:
            await asyncio.sleep(stall)  # a stuck stream: the client should give up and retry
        for field in ("reasoning_content", "reasoning", "content"):
            for piece in pieces(message.get(field), self.chunk_chars):
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                await event(delta({field: piece}))
        await event(delta({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            await event([], usage={"prompt_tokens": prompt_tokens(body["messages"]), "completion_tokens": tokens,
                                   "total_tokens": prompt_tokens(body["messages"]) + tokens})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@contextlib.contextmanager
def serving() -> Iterator[FakeServer]:
    """A FakeServer listening on a free local port (its ``url``) until the block ends."""
    fake = FakeServer()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder = {}

    async def start():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", fake.handle)
        app.router.add_get("/v1/models", fake.models)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["runner"] = runner
        holder["port"] = site._server.sockets[0].getsockname()[1]

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(10)
    fake.url = f"http://127.0.0.1:{holder['port']}/v1"

    async def stop():
        await holder["runner"].cleanup()
        # handlers still in a scripted stall: end them here, not when the loop is garbage-collected
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
