"""Chat template rendering with labels on assistant tokens only.

Assistant spans are found by rendering, not by trusting ``{% generation %}`` support in the template:
each assistant message's content is replaced by a unique placeholder, the conversation is rendered up to
that message (with the generation prompt) and through it, and the difference is the assistant's turn
(content plus the end-of-turn marker). Placeholders also keep ``<think>...</think>`` intact: templates
such as R1-Distill's strip reasoning from assistant content, but a placeholder has nothing to strip, and
the raw content is put back afterwards. Tokens are labelled by character offsets, so BPE merges across a
boundary cannot shift the mask.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInput

PLACEHOLDER = "\ue000bm-assistant-{}\ue001"  # private-use characters: never in real text


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 outside assistant turns

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != -100)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_text_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    slots = [dict(m, content=PLACEHOLDER.format(i)) if m["role"] == "assistant" else m
             for i, m in enumerate(messages)]
    full = _render(tokenizer, slots, False)
    spans = []  # in placeholder coordinates
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, slots[:i], True)
        through = _render(tokenizer, slots[:i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise InvalidInput("chat template is not prefix-stable (rendering a conversation prefix does not give "
                               "a prefix of the full rendering); set spec.chatTemplate to a template that is")
        if PLACEHOLDER.format(i) not in through[len(before):]:
            raise InvalidInput(f"chat template drops the content of assistant message {i}")
        end = len(through.rstrip())  # the trailing newline after the end-of-turn marker is never generated
        spans.append((len(before), end))
    # put the real contents back, shifting spans by the length differences
    marks, cursor = [], 0  # (position, placeholder length, content) in placeholder coordinates
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            pos = full.index(PLACEHOLDER.format(i), cursor)
            marks.append((pos, len(PLACEHOLDER.format(i)), m["content"]))
            cursor = pos + 1
    pieces, last = [], 0
    for pos, length, content in marks:
        pieces += [full[last:pos], content]
        last = pos + length
    pieces.append(full[last:])

    def to_real(x: int) -> int:
        return x + sum(len(c) - n for p, n, c in marks if p + n <= x)

    return "".join(pieces), [(to_real(a), to_real(b)) for a, b in spans]


def encode(tokenizer, messages: list[dict]) -> Encoded:
    text, spans = assistant_text_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [-100] * len(ids)
    k = 0
    for t, (start, _end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= start < spans[k][1]:
            labels[t] = ids[t]
    return Encoded(ids, labels)
