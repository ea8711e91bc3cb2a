"""A local OpenAI-compatible chat-completions server (aiohttp in a thread) for engine and stage tests."""
from __future__ import annotations

import asyncio
import threading
from typing import Callable

import pytest
from aiohttp import web


class FakeServer:
    """Chat completions that echo the prompt; scripted failures; records what it saw."""

    def __init__(self):
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.fail_plan: list[tuple[int, dict]] = []  # (status, headers) served before real answers
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.status_override: int | None = None
        self.reasoning = False
        self.answer: Callable[[dict], str] | None = None  # body -> content, replaces the echo
        self.message: Callable[[dict], dict] | None = None  # body -> the whole message (reasoning fields too)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.auth.append(request.headers.get("Authorization"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.status_override:
                return web.json_response({"error": {"message": "bad model"}}, status=self.status_override)
            if self.fail_plan:
                status, headers = self.fail_plan.pop(0)
                return web.json_response({"error": "busy"}, status=status, headers=headers)
            self.requests.append(body)
            prompt = body["messages"][-1]["content"]
            text = self.answer(body) if self.answer else f"echo:{prompt}:seed={body['seed']}"
            finish = "length" if body["max_tokens"] < 5 else "stop"
            message = {"role": "assistant", "content": text}
            if self.reasoning:
                message = {"role": "assistant", "content": "\\boxed{4}", "reasoning_content": "2+2 is 4"}
            if self.message:
                message = self.message(body)
            return web.json_response({"choices": [{"index": 0, "message": message, "finish_reason": finish}],
                                      "usage": {"completion_tokens": len(text.split(":"))}})
        finally:
            self.in_flight -= 1


@pytest.fixture
def server():
    fake = FakeServer()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder = {}

    async def start():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", fake.handle)
        runner = web.AppRunner(app)
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
    yield fake
    asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
