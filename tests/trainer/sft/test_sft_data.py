"""Data: records in both layouts and formats, chat templating, assistant-only labels, over-length policy."""
from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from branchmerge.api.sft import BranchSFTSpec
from branchmerge.trainer.errors import InvalidInput
from branchmerge.trainer.sft.chat import encode
from branchmerge.trainer.sft.dataset import build_samples
from branchmerge.trainer.sft.records import Layout, load_dataset, mix

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "what is 2 + 3?"},
    {"role": "assistant", "content": "<think>2 + 3 = 5</think> The answer is \\boxed{5}."},
    {"role": "user", "content": "and 4 + 4?"},
    {"role": "assistant", "content": "8"},
]

# an R1-Distill-style template: strips reasoning from assistant content
STRIPPING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{% set content = m['content'].split('</think>')[-1] %}"
    "{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def labelled_text(tok, enc) -> str:
    return tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != -100])


def test_only_assistant_tokens_carry_labels(tiny_tokenizer):
    enc = encode(tiny_tokenizer, CONVERSATION)
    assert len(enc.input_ids) == len(enc.labels)
    assert labelled_text(tiny_tokenizer, enc) == (
        "<think>2 + 3 = 5</think> The answer is \\boxed{5}.<|im_end|>8<|im_end|>")
    # every labelled token equals its input id; system, user and the assistant header carry none
    assert all(label in (-100, tok) for tok, label in zip(enc.input_ids, enc.labels))
    text = tiny_tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "what is 2 + 3?" in text
    first = enc.labels.index(next(x for x in enc.labels if x != -100))
    assert tiny_tokenizer.decode(enc.input_ids[:first]).endswith("<|im_start|>assistant\n")


def test_think_blocks_survive_a_template_that_strips_them(tiny_tokenizer):
    tiny_tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tiny_tokenizer.chat_template = STRIPPING_TEMPLATE
    enc = encode(tiny_tokenizer, CONVERSATION[1:3])
    assert "<think>2 + 3 = 5</think>" in tiny_tokenizer.decode(enc.input_ids)
    assert labelled_text(tiny_tokenizer, enc).startswith("<think>2 + 3 = 5</think> The answer")


def test_jsonl_and_parquet_with_configurable_fields(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"q": "hi", "a": "hello"}) + "\n\n")
    pq.write_table(pa.Table.from_pylist([{"q": "x", "a": "y"}, {"q": "z", "a": "w"}]), tmp_path / "b.parquet")
    convs = load_dataset(tmp_path, Layout("prompt-response", prompt_field="q", response_field="a"), "spec.data[0]")
    assert convs[0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert len(convs) == 3
    chat = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CONVERSATION}]), chat)
    assert load_dataset(chat, Layout(), "d") == [CONVERSATION]


@pytest.mark.parametrize("line, message", [
    ({"question": "hi", "response": "x"}, "missing string field 'prompt'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "needs a role"),
])
def test_bad_records_name_the_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "response": "ok"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(InvalidInput, match=message) as err:
        load_dataset(path, Layout(), "spec.data[0]")
    assert f"{path}:2" in str(err.value)


def test_mixing_weights_resize_each_dataset():
    a, b = list(range(10)), list(range(100, 104))
    mixed = mix([a, b], [0.5, 2.5], seed=3)
    assert len(mixed) == 5 + 10  # round(0.5 x 10) + round(2.5 x 4)
    from_b = Counter(x for x in mixed if x >= 100)
    assert sum(from_b.values()) == 10 and all(2 <= from_b[x] <= 3 for x in b)  # two whole copies + a subset
    assert len({x for x in mixed if x < 100}) == 5  # a subset without repeats
    assert mix([a, b], [1.0, 1.0], seed=0) == a + b  # 1.0 everywhere = concatenation


def _spec(tmp_path, **training):
    return BranchSFTSpec.model_validate({"base": {"uri": "file:///m"}, "data": [{"uri": (tmp_path / "d.jsonl").as_uri()}],
                                         "training": training})


def _resolve(ref, what):
    from branchmerge.api.uris import local_path

    return local_path(ref.uri)


def test_over_length_samples_are_dropped_or_truncated_and_counted(tmp_path, tiny_tokenizer):
    long = "word " * 200
    rows = [{"prompt": "hi", "response": "short"}, {"prompt": "hi", "response": long}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, stats = build_samples(_spec(tmp_path, maxSeqLen=64, overLength="drop"), tiny_tokenizer, _resolve)
    assert (len(samples), stats.dropped, stats.truncated) == (1, 1, 0)
    samples, stats = build_samples(_spec(tmp_path, maxSeqLen=64, overLength="truncate"), tiny_tokenizer, _resolve)
    assert (len(samples), stats.dropped, stats.truncated) == (2, 0, 1)
    assert max(len(s.input_ids) for s in samples) == 64


def test_prompt_longer_than_max_seq_len_is_invalid(tmp_path, tiny_tokenizer):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "word " * 100, "response": "ok"}) + "\n")
    with pytest.raises(InvalidInput, match=r"maxSeqLen=32: no sample of spec.data\[0\] fits .*shortest prompt"):
        build_samples(_spec(tmp_path, maxSeqLen=32, overLength="truncate"), tiny_tokenizer, _resolve)


def test_a_published_folder_reads_only_its_data_files(tmp_path):
    """A TeacherGen output: data shards beside _manifest.json and teachergen.json metadata."""
    (tmp_path / "shard-0.jsonl").write_text(json.dumps({"messages": CONVERSATION[1:3], "promptId": "p0"}) + "\n")
    (tmp_path / "_manifest.json").write_text(json.dumps({"files": {}}))
    (tmp_path / "teachergen.json").write_text(json.dumps({"metrics": {}}))
    assert load_dataset(tmp_path, Layout(), "spec.data[0]") == [CONVERSATION[1:3]]
