"""Streamed chat completions: server-sent events in, one answer out.

:class:`SSEDecoder` turns the bytes of a ``text/event-stream`` body into the ``data`` payloads of its events,
whatever the network's chunking (a chunk may end mid-line or hold many events). :class:`StreamedAnswer`
folds the OpenAI ``chat.completion.chunk`` payloads into the text, the reasoning, the finish reason and the
usage of choice 0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

DONE = "[DONE]"


class SSEDecoder:
    """Incremental event-stream parser (only the ``data`` field matters to chat completions)."""

    def __init__(self):
        self._pending = b""  # an unfinished line
        self._data: list[str] = []  # data lines of the event being read

    def feed(self, chunk: bytes) -> list[str]:
        """The payloads of the events that ``chunk`` completes, in order."""
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        events = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
            if not line:  # a blank line ends the event
                events.extend(self._dispatch())
            elif not line.startswith(":"):  # ":..." is a comment (keep-alive)
                name, _, value = line.partition(":")
                if name == "data":
                    self._data.append(value[1:] if value.startswith(" ") else value)
        return events

    def close(self) -> list[str]:
        """End of the body: an event not followed by a blank line still counts."""
        events = self.feed(b"\n") if self._pending else []
        return events + self._dispatch()

    def _dispatch(self) -> list[str]:
        if not self._data:
            return []
        payload, self._data = "\n".join(self._data), []
        return [payload]


class StreamError(Exception):
    """The server put an error object in the stream; ``status`` is its HTTP-like code when it gave one."""

    def __init__(self, message: str, status: int | None):
        super().__init__(message)
        self.status = status


@dataclass
class StreamedAnswer:
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    done: bool = False  # the server sent [DONE]

    def add(self, payload: str) -> None:
        """Fold one event payload in; raises ValueError on a malformed one, StreamError on an error event."""
        if payload.strip() == DONE:
            self.done = True
            return
        event = json.loads(payload)
        if not isinstance(event, dict):
            raise ValueError("a stream event is not an object")
        if event.get("error") is not None or event.get("object") == "error":
            raise _stream_error(event)
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]  # with include_usage, the last chunk (choices: [])
        for choice in event.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            self.content.append(delta.get("content") or "")
            # same precedence as a whole message: reasoning_content (DeepSeek, older vLLM), else reasoning
            self.reasoning.append(delta.get("reasoning_content") or delta.get("reasoning") or "")
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    @property
    def finished(self) -> bool:
        """A complete answer: a finish reason arrived (some servers close without [DONE])."""
        return self.finish_reason is not None

    def text(self) -> tuple[str, str | None]:
        """(content, reasoning or None)."""
        return "".join(self.content), "".join(self.reasoning) or None


def _stream_error(event: dict) -> StreamError:
    err = event.get("error") if isinstance(event.get("error"), dict) else event
    message = str(err.get("message") or event.get("error") or "error event")
    code = err.get("code")
    status = code if isinstance(code, int) and not isinstance(code, bool) else None
    return StreamError(message, status)
