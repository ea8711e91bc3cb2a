"""Test helper: an OpenAI-compatible chat server on loopback whose "model" answers the synthetic benchmarks by
fixed rules, so a whole Eval has scores, token counts and truncations known in advance."""
from __future__ import annotations

import asyncio
import re
import threading

from aiohttp import web

CODE = {
    "print 2*n": "print(2 * int(input()))",  # correct
    "their sum": "while True:\n    pass",  # never stops: sandbox timeout
    "the largest": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n"
                   "print(max(map(int, input().split())))",  # right answer, but reaches for the network
    "Complete the function": "class Solution:\n    def add(self, a, b):\n        return a + b",  # correct
}


def answer(messages: list[dict], max_tokens: int) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) for one request."""
    prompt = messages[-1]["content"]
    if m := re.search(r"Tom has (\d+) apples and buys (\d+) more", prompt):
        a, b = int(m.group(1)), int(m.group(2))
        if a % 2 == 0:
            return f"{a} + {b} = {a + b}, so \\boxed{{{a + b}}}", 10, "stop"
        if b % 2 == 0:
            return "I guess \\boxed{0}", 20, "stop"
        return "Let me think about this for a very long time", max_tokens, "length"
    if "one half of 3" in prompt:
        return "\\boxed{1.5}", 10, "stop"  # math-verify: 1.5 == \frac{3}{2}
    if m := re.search(r"sum of (\d+) and (\d+)", prompt):
        if messages[0]["role"] != "system":
            raise web.HTTPBadRequest(text="the mcq benchmark sets a system prompt")
        total = int(m.group(1)) + int(m.group(2))
        options = dict(re.findall(r"^([A-D])\. (.+)$", prompt, re.M))
        want = str(total + 1) if total == 51 else str(total)  # one question answered wrong on purpose
        letter = next(k for k, v in options.items() if v == want)
        return f"The answer is \\boxed{{{letter}}}", 5, "stop"
    for key, program in CODE.items():
        if key in prompt:
            return f"```python\n{program}\n```", 30, "stop"
    raise web.HTTPBadRequest(text=f"unexpected prompt {prompt[:80]!r}")


SEEN: list[dict] = []  # every request body, for assertions
DELAY = [0.0]  # seconds before each answer (a test sets DELAY[0] to have time to kill a worker mid-run)


async def _chat(request: web.Request) -> web.Response:
    body = await request.json()
    SEEN.append(body)
    if DELAY[0]:
        await asyncio.sleep(DELAY[0])
    text, tokens, reason = answer(body["messages"], body["max_tokens"])
    return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                           "finish_reason": reason}],
                              "usage": {"completion_tokens": tokens}})


class ScriptedServer:
    """``with ScriptedServer() as url:`` serves /v1/chat/completions on 127.0.0.1 (a free port)."""

    def __enter__(self) -> str:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start():
            app = web.Application()
            app.router.add_post("/v1/chat/completions", _chat)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
                                       daemon=True)
        self.thread.start()
        ready.wait(10)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
