"""Read training records (JSONL or Parquet, a file or a folder of them) and turn them into chat messages.

Published layouts are read as they are (format ``auto`` decides per record, and per Parquet file from its
columns, in this order):

- ``messages`` (the messagesField): OpenAI-style turns ``{"role", "content"}``, a system turn included
  (OpenR1-Math-220k trains on this column).
- ``conversations``: ShareGPT turns ``{"from", "value"}`` with ``from`` human/gpt/system (OpenThoughts-114k).
  Turns of either field may use either spelling.
- prompt/response: a user prompt and an assistant response from two configurable string fields.

A string ``system`` field becomes the system turn of a conversation that has none (OpenThoughts keeps its
system prompt in a separate column); a conversation's own system turn wins.

OpenThoughts' thought markers are rewritten into the think form every engine writes (trainer/engine/chat.py):
an assistant turn ``<|begin_of_thought|> T <|end_of_thought|> <|begin_of_solution|> S <|end_of_solution|>``
becomes ``<think>\\nT\\n</think>\\n\\nS``, so traces start with the think tag a template's generation prompt opens
(chat.py labels it once, never doubled). In other turns (OpenThoughts' system prompt describes the format)
the thought markers become the tags and the solution markers are dropped, so the prompt describes the text the
model learns to write.

Parquet files are read with only the columns the layout needs (trainer/datasets.py): OpenR1's ``generations``
(several full traces per row) is never decoded. A file where no layout fits is exit 2, naming the file and its
columns.

``Layout.require_true`` keeps only records whose field is true (a list: any element true, as OpenR1's
per-generation ``correctness_math_verify``). It is off by default, and read from spec.data[i].requireTrue once
the API has that field (proposed; until then every record is used).

Datasets are mixed by weight: weight w contributes round(w x size) records per epoch (repeating whole copies,
then a seeded subset), so weight 1.0 everywhere is plain concatenation.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from ..datasets import iter_records
from ..errors import InvalidInput

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT's "from" values besides ROLES
CONVERSATIONS_FIELD = "conversations"  # ShareGPT (OpenThoughts)
SYSTEM_FIELD = "system"  # a system prompt beside the turns (OpenThoughts)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # the platform's think form (trainer/engine/chat.py)
BEGIN_THOUGHT, END_THOUGHT = "<|begin_of_thought|>", "<|end_of_thought|>"  # OpenThoughts' markers
BEGIN_SOLUTION, END_SOLUTION = "<|begin_of_solution|>", "<|end_of_solution|>"
MARKERS = (BEGIN_THOUGHT, END_THOUGHT, BEGIN_SOLUTION, END_SOLUTION)


@dataclass(frozen=True)
class Layout:
    """How records of one dataset are laid out (from spec.data[i])."""

    format: str = "auto"  # auto | messages | prompt-response
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    require_true: str | None = None  # keep only records where this field is true (module docstring)

    @classmethod
    def of(cls, ref) -> "Layout":
        """The layout of spec.data[i]."""
        return cls(ref.format, ref.messages_field, ref.prompt_field, ref.response_field, ref.require_true)

    def conversation_field(self, fields: Collection[str]) -> str | None:
        """The field holding the turns of a record (or file) with these fields; None: prompt/response."""
        if self.format == "messages":
            return self.messages_field
        if self.format == "prompt-response":
            return None
        return next((f for f in (self.messages_field, CONVERSATIONS_FIELD) if f in fields), None)

    def columns(self, names: list[str]) -> list[str]:
        """The Parquet columns to read from a file with ``names`` (ValueError when no layout fits)."""
        field = self.conversation_field(names)
        if field is not None and field in names:
            wanted = [field]
        elif field is None and self.prompt_field in names and self.response_field in names:
            wanted = [self.prompt_field, self.response_field]
        else:
            raise ValueError(f"no known record layout: expected {self._expected()}")
        if SYSTEM_FIELD in names:
            wanted.append(SYSTEM_FIELD)
        if self.require_true:
            if self.require_true not in names:
                raise ValueError(f"no column {self.require_true!r} to filter on (requireTrue)")
            wanted.append(self.require_true)
        return list(dict.fromkeys(wanted))

    def _expected(self) -> str:
        pair = f"{self.prompt_field!r} and {self.response_field!r} columns"
        if self.format == "messages":
            return f"a {self.messages_field!r} column"
        if self.format == "prompt-response":
            return pair
        return f"a {self.messages_field!r} or {CONVERSATIONS_FIELD!r} column, or {pair}"


def _turn(m: Any, field: str, j: int, where: str) -> dict:
    """One turn as {role, content}, from OpenAI (role/content) or ShareGPT (from/value) keys."""
    if not isinstance(m, dict):
        m = {}
    role = m.get("role") if m.get("role") is not None else m.get("from")
    role = SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else None
    content = m.get("content") if m.get("content") is not None else m.get("value")
    if role not in ROLES or not isinstance(content, str):
        raise InvalidInput(f"{where}: {field}[{j}] needs a role ({'/'.join(ROLES)}; ShareGPT from: human/gpt) "
                           "and a string content")
    return {"role": role, "content": content}


def _conversation(record: dict, field: str, where: str) -> list[dict]:
    turns = record.get(field)
    if not isinstance(turns, list) or not turns:
        raise InvalidInput(f"{where}: field {field!r} missing or not a non-empty list")
    messages = [_turn(m, field, j, where) for j, m in enumerate(turns)]
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidInput(f"{where}: {field} has no assistant message to learn from")
    return messages


def _prompt_response(record: dict, layout: Layout, where: str) -> list[dict]:
    for field in (layout.prompt_field, layout.response_field):
        if not isinstance(record.get(field), str):
            hint = "" if layout.format != "auto" else \
                f" (and no {layout.messages_field!r} or {CONVERSATIONS_FIELD!r} field)"
            raise InvalidInput(f"{where}: missing string field {field!r}{hint}")
    return [{"role": "user", "content": record[layout.prompt_field]},
            {"role": "assistant", "content": record[layout.response_field]}]


def with_system(messages: list[dict], system: Any, where: str) -> list[dict]:
    """``messages`` led by the record's separate system prompt, unless empty or the turns have their own."""
    if system is None or system == "" or any(m["role"] == "system" for m in messages):
        return messages
    if not isinstance(system, str):
        raise InvalidInput(f"{where}: field {SYSTEM_FIELD!r} must be a string")
    return [{"role": "system", "content": system}] + messages


def _plain_markers(text: str) -> str:
    for marker, tag in ((BEGIN_THOUGHT, THINK_OPEN), (END_THOUGHT, THINK_CLOSE), (BEGIN_SOLUTION, ""),
                        (END_SOLUTION, "")):
        text = text.replace(marker, tag)
    return text


def think_tags(content: str, role: str) -> str:
    """OpenThoughts' thought/solution markers in the platform's think form (module docstring)."""
    if not any(marker in content for marker in MARKERS):
        return content
    body = content.strip()
    if role != "assistant" or not body.startswith(BEGIN_THOUGHT):
        return _plain_markers(content)
    thought, closed, solution = body[len(BEGIN_THOUGHT):].partition(END_THOUGHT)
    if not closed:  # cut off inside its thought, as a truncated engine trace
        return f"{THINK_OPEN}\n{_plain_markers(thought).strip()}"
    return f"{THINK_OPEN}\n{thought.strip()}\n{THINK_CLOSE}\n\n{_plain_markers(solution).strip()}"


def to_messages(record: Any, layout: Layout, where: str) -> list[dict]:
    if not isinstance(record, dict):
        raise InvalidInput(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    field = layout.conversation_field(record)
    if field is not None:
        messages = _conversation(record, field, where)
    else:
        messages = _prompt_response(record, layout, where)
    messages = with_system(messages, record.get(SYSTEM_FIELD), where)
    return [dict(m, content=think_tags(m["content"], m["role"])) for m in messages]


def is_kept(record: dict, layout: Layout, where: str) -> bool:
    """Whether ``layout.require_true`` keeps the record (a list: any element true; null: not kept)."""
    if not layout.require_true:
        return True
    if layout.require_true not in record:
        raise InvalidInput(f"{where}: no field {layout.require_true!r} to filter on (requireTrue)")
    value = record[layout.require_true]
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, list) and all(v is None or isinstance(v, bool) for v in value):
        return any(v is True for v in value)
    raise InvalidInput(f"{where}: field {layout.require_true!r} must be a boolean or a list of booleans")


def load_dataset(path: Path, layout: Layout, what: str) -> list[list[dict]]:
    conversations, seen = [], 0
    for where, record in iter_records(path, what, columns=layout.columns):
        seen += 1
        if is_kept(record, layout, where):
            conversations.append(to_messages(record, layout, where))
    if not seen:
        raise InvalidInput(f"{what}: dataset {path} is empty (no records)")
    if not conversations:
        raise InvalidInput(f"{what}: none of the {seen} records of {path} has {layout.require_true!r} true")
    return conversations


def mix(datasets: list[list[Any]], weights: list[float], seed: int) -> list[Any]:
    """Concatenate datasets, each resized to round(weight x size) (whole repeats + a seeded subset)."""
    rng = random.Random(seed)
    out: list[Any] = []
    for items, weight in zip(datasets, weights):
        want = max(1, round(weight * len(items)))
        whole, rest = divmod(want, len(items))
        out.extend(items * whole)
        out.extend(items[i] for i in sorted(rng.sample(range(len(items)), rest)))
    return out
