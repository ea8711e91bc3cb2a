"""Chat template rendering with labels on assistant tokens only.

Assistant spans are found by rendering, not by trusting ``{% generation %}`` support in the template:
each assistant message's content is replaced by a unique placeholder, and the conversation is rendered up
to that message without and with the generation prompt, and through it. The text between the header of
the rendered turn and its end is the assistant's span (content plus the end-of-turn marker).

Generation-prompt suffix: a template may append more after the assistant header when it opens a turn for
generation than when it renders a finished turn. R1-Distill's generation prompt is ``<｜Assistant｜><think>\\n``
while a rendered turn is ``<｜Assistant｜>content``: ``<think>\\n`` is the suffix. The model at inference sees the
generation prompt and then writes the rest, so the training text of a turn must be header + suffix + what
was generated. Teacher traces start with the suffix already (the engines put the opened think tag back,
trainer/engine/chat.py); content that does not (raw offline traces of older versions) gets it prepended, and
content that opens the tag in its own spelling (``<think>`` without the newline) is left alone. The suffix
belongs to the labelled span.

Placeholders also keep ``<think>...</think>`` intact: templates such as R1-Distill's strip reasoning from
assistant content, but a placeholder has nothing to strip, and the raw content is put back afterwards (in
every assistant turn, earlier ones included). Tokens are labelled by character offsets, so BPE merges across
a boundary cannot shift the mask.

``chat_template`` (spec.chatTemplate) renders instead of the tokenizer's own template without replacing it.
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


def _render(tokenizer, messages: list[dict], generation_prompt: bool, chat_template: str | None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=chat_template)


def with_generation_suffix(content: str, suffix: str) -> str:
    """Assistant content as the model writes it after the generation prompt (which ends with ``suffix``)."""
    if not suffix or content.startswith(suffix):
        return content
    tag = suffix.strip()
    if tag and content.lstrip().startswith(tag):  # opens it in its own spelling: never doubled
        return content
    return suffix + content


def assistant_text_spans(tokenizer, messages: list[dict],
                         chat_template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    slots = [dict(m, content=PLACEHOLDER.format(i)) if m["role"] == "assistant" else m
             for i, m in enumerate(messages)]
    full = _render(tokenizer, slots, False, chat_template)
    spans = []  # in placeholder coordinates
    contents: dict[int, str] = {}  # what each placeholder stands for in the training text
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        placeholder = PLACEHOLDER.format(i)
        context = _render(tokenizer, slots[:i], False, chat_template)
        prompt = _render(tokenizer, slots[:i], True, chat_template)
        through = _render(tokenizer, slots[:i + 1], False, chat_template)
        if not (prompt.startswith(context) and through.startswith(context) and full.startswith(through)):
            raise InvalidInput("chat template is not prefix-stable (rendering a conversation prefix does not give "
                               "a prefix of the full rendering); set spec.chatTemplate to a template that is")
        at = through.find(placeholder, len(context))
        if at < 0:
            raise InvalidInput(f"chat template drops the content of assistant message {i}")
        header = through[len(context):at]  # what the finished turn renders before its content
        opener = prompt[len(context):]  # what the generation prompt appends
        if opener.startswith(header):  # the usual case; R1-Distill adds a suffix (<think>\n) to the header
            contents[i] = with_generation_suffix(m["content"], opener[len(header):])
            start = at
        elif header.startswith(opener):  # the rendered turn adds text the model generates itself
            contents[i] = m["content"]
            start = len(prompt)
        else:
            raise InvalidInput(f"chat template: the generation prompt {opener!r} does not open assistant message "
                               f"{i} as rendered ({header!r}); set spec.chatTemplate to a template where it does")
        end = len(through.rstrip())  # the trailing newline after the end-of-turn marker is never generated
        spans.append((start, end))
    # put the real contents back, shifting spans by the length differences
    marks, cursor = [], 0  # (position, placeholder length, content) in placeholder coordinates
    for i in contents:
        pos = full.index(PLACEHOLDER.format(i), cursor)
        marks.append((pos, len(PLACEHOLDER.format(i)), contents[i]))
        cursor = pos + 1
    pieces, last = [], 0
    for pos, length, content in marks:
        pieces += [full[last:pos], content]
        last = pos + length
    pieces.append(full[last:])

    def to_real(x: int) -> int:
        return x + sum(len(c) - n for p, n, c in marks if p + n <= x)

    return "".join(pieces), [(to_real(a), to_real(b)) for a, b in spans]


def encode(tokenizer, messages: list[dict], chat_template: str | None = None) -> Encoded:
    text, spans = assistant_text_spans(tokenizer, messages, chat_template)
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
