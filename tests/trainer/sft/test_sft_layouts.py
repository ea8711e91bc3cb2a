"""Published dataset layouts read as they are: OpenR1-Math (Parquet, ``messages``, large ``generations``),
OpenThoughts (ShareGPT ``conversations`` + a ``system`` column, thought markers), plain prompt/response JSONL.

The files are written here with the structure of the datasets' public cards (small, synthetic content).
``generations`` is made unreadable in the written file (its column chunks overwritten), so any reader that
decodes it fails: that a read succeeds proves the column was never decoded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from branchmerge.api.sft import BranchSFTSpec
from branchmerge.trainer.datasets import iter_records, read_records
from branchmerge.trainer.errors import InvalidInput
from branchmerge.trainer.sft.dataset import build_samples
from branchmerge.trainer.sft.records import Layout, load_dataset, think_tags, to_messages
from branchmerge.trainer.stage import run_stage

from tests.chat_templates import ASSISTANT, BOS, EOS, QWEN25_SYSTEM, USER

from .sft_helpers import make_spec, run_sft, write_jsonl

# ---- the published layouts, written by the tests ---------------------------------------------------------


def openr1_trace(i: int) -> str:
    return f"<think>\nLet me add {i} and {i}: {i} + {i} = {2 * i}.\n</think>\n\nThe answer is $\\boxed{{{2 * i}}}$."


def openr1_rows(n: int) -> list[dict]:
    """Rows of open-r1/OpenR1-Math-220k: metadata, 2-4 full generations per problem, and ``messages``."""
    rows = []
    for i in range(n):
        problem = f"Please reason step by step, and put your final answer within \\boxed{{}}. What is {i} + {i}?"
        generations = [openr1_trace(i) + f" (generation {g}) " + "long reasoning " * 2000 for g in range(3)]
        rows.append({
            "problem": problem, "solution": f"{i} + {i} = {2 * i}", "answer": str(2 * i),
            "problem_type": "Algebra", "question_type": "math-word-problem", "source": "olympiads",
            "uuid": f"uuid-{i}", "is_reasoning_complete": [True, True, i % 2 == 0],
            "generations": generations,
            "correctness_math_verify": [i % 3 != 0, False, i % 2 == 0],
            "correctness_llama": None, "finish_reasons": None, "correctness_count": 1,
            "messages": [{"content": problem, "role": "user"}, {"content": openr1_trace(i), "role": "assistant"}],
        })
    return rows


def corrupt_column(path: Path, column: str) -> None:
    """Overwrite every chunk of ``column`` with garbage: decoding it fails, other columns still read."""
    meta = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            chunk = meta.row_group(rg).column(c)
            if chunk.path_in_schema.split(".")[0] == column:
                start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
                data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


def write_openr1(path: Path, n: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(openr1_rows(n)), path, row_group_size=4)
    corrupt_column(path, "generations")
    return path


OT_SYSTEM = ("Your role as an assistant involves exploring questions through a long thinking process before "
             "giving a precise solution. Structure your response in two sections, Thought and Solution. In the "
             "Thought section write your reasoning as: <|begin_of_thought|> {steps separated by '\\n\\n'} "
             "<|end_of_thought|> In the Solution section give the final solution as: <|begin_of_solution|> "
             "{the final, precise solution} <|end_of_solution|> Now solve the question below.")
OT_THOUGHT = "Okay, 3 + 4.\n\nCounting up from 3: 4, 5, 6, 7."
OT_SOLUTION = "3 + 4 = \\boxed{7}"
OT_ASSISTANT = (f"<|begin_of_thought|>\n\n{OT_THOUGHT}\n\n<|end_of_thought|>\n\n"
                f"<|begin_of_solution|>\n\n{OT_SOLUTION}\n\n<|end_of_solution|>")
OT_TRACE = f"<think>\n{OT_THOUGHT}\n</think>\n\n{OT_SOLUTION}"  # the platform's think form


def write_openthoughts(path: Path, n: int = 3) -> Path:
    """open-thoughts/OpenThoughts-114k (default config): ``system`` and ShareGPT ``conversations``."""
    rows = [{"system": OT_SYSTEM,
             "conversations": [{"from": "user", "value": f"Return your final response within \\boxed{{}}. "
                                                         f"What is 3 + 4? ({i})"},
                               {"from": "assistant", "value": OT_ASSISTANT}]} for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def spec_for(*paths: Path, **data) -> BranchSFTSpec:
    return BranchSFTSpec.model_validate({"base": {"uri": "file:///m"},
                                         "data": [{"uri": p.as_uri(), **data} for p in paths]})


def _resolve(ref, what):
    from branchmerge.api.uris import local_path

    return local_path(ref.uri)


def decoded(tok, sample) -> tuple[str, str]:
    """(whole text, labelled text) of a training sample."""
    labelled = [t for t, label in zip(sample.input_ids, sample.labels) if label != -100]
    return tok.decode(sample.input_ids), tok.decode(labelled)


# ---- OpenR1-Math: Parquet, messages, generations never decoded ---------------------------------------------


def test_openr1_parquet_trains_on_messages_without_decoding_generations(tmp_path):
    path = write_openr1(tmp_path / "openr1" / "train-00000-of-00001.parquet")
    with pytest.raises(InvalidInput, match="cannot read Parquet"):  # the column really is unreadable
        list(iter_records(path, "d"))
    assert Layout().columns(pq.read_schema(path).names) == ["messages"]
    conversations = load_dataset(path, Layout(), "spec.data[0]")
    assert len(conversations) == 6
    assert conversations[1] == [{"role": "user", "content": openr1_rows(2)[1]["problem"]},
                                {"role": "assistant", "content": openr1_trace(1)}]


def test_openr1_with_r1_template_learns_the_trace_after_the_opened_think_tag(tmp_path, r1_tokenizer):
    path = write_openr1(tmp_path / "openr1.parquet", n=2)
    samples, stats = build_samples(spec_for(path), r1_tokenizer, _resolve)
    assert (stats.records, len(samples)) == (2, 2)
    text, labelled = decoded(r1_tokenizer, samples[1])
    problem = openr1_rows(2)[1]["problem"]
    assert text == f"{BOS}{USER}{problem}{ASSISTANT}{openr1_trace(1)}{EOS}"
    assert labelled == openr1_trace(1) + EOS  # <think>\n once, as the generation prompt opens it


def test_correctness_filter_keeps_rows_math_verify_accepted(tmp_path):
    path = write_openr1(tmp_path / "openr1.parquet", n=6)
    layout = Layout(require_true="correctness_math_verify")
    assert layout.columns(pq.read_schema(path).names) == ["messages", "correctness_math_verify"]
    kept = load_dataset(path, layout, "spec.data[0]")
    # correctness_math_verify = [i % 3 != 0, False, i % 2 == 0]: only i = 3 has none true
    assert [c[1]["content"] for c in kept] == [openr1_trace(i) for i in (0, 1, 2, 4, 5)]
    # off by default (the dataset as published); spec.data[i].requireTrue turns it on
    assert Layout.of(spec_for(path).data[0]) == Layout()
    assert len(load_dataset(path, Layout.of(spec_for(path).data[0]), "spec.data[0]")) == 6
    assert Layout.of(spec_for(path, requireTrue="correctness_math_verify").data[0]) == layout
    with pytest.raises(InvalidInput, match="no column 'verified' to filter on"):
        load_dataset(path, Layout(require_true="verified"), "spec.data[0]")


# ---- OpenThoughts: ShareGPT conversations, a system column, thought markers ------------------------------


def test_openthoughts_markers_become_the_think_form():
    assert think_tags(OT_ASSISTANT, "assistant") == OT_TRACE
    assert think_tags("<|begin_of_thought|>\n\nstill thinking", "assistant") == "<think>\nstill thinking"
    system = think_tags(OT_SYSTEM, "system")
    assert "<think> {steps separated by '\\n\\n'} </think>" in system and "<|" not in system
    assert think_tags("<think>\nx\n</think>\n\ny", "assistant") == "<think>\nx\n</think>\n\ny"  # untouched


def test_openthoughts_parquet_with_r1_template(tmp_path, r1_tokenizer):
    path = write_openthoughts(tmp_path / "ot.parquet")
    samples, _ = build_samples(spec_for(path), r1_tokenizer, _resolve)
    text, labelled = decoded(r1_tokenizer, samples[0])
    system = think_tags(OT_SYSTEM, "system")
    assert text == (f"{BOS}{system}{USER}Return your final response within \\boxed{{}}. What is 3 + 4? (0)"
                    f"{ASSISTANT}{OT_TRACE}{EOS}")
    assert labelled == OT_TRACE + EOS  # starts with the think tag the generation prompt opens, not doubled
    assert "begin_of_thought" not in text and "begin_of_solution" not in text


def test_openthoughts_system_column_replaces_the_default_system_prompt(tmp_path, qwen_tokenizer):
    path = write_openthoughts(tmp_path / "ot.parquet", n=1)
    samples, _ = build_samples(spec_for(path), qwen_tokenizer, _resolve)
    text, labelled = decoded(qwen_tokenizer, samples[0])
    assert text.startswith(f"<|im_start|>system\n{think_tags(OT_SYSTEM, 'system')}<|im_end|>\n<|im_start|>user\n")
    assert QWEN25_SYSTEM not in text
    assert labelled == OT_TRACE + "<|im_end|>"  # the system prompt and the user turn carry no labels


def test_sharegpt_turns_human_gpt_and_an_own_system_turn(tmp_path):
    record = {"system": "column prompt",
              "conversations": [{"from": "system", "value": "turn prompt"}, {"from": "human", "value": "hi"},
                                {"from": "gpt", "value": "hello"}]}
    assert to_messages(record, Layout(), "r") == [  # the conversation's own system turn wins
        {"role": "system", "content": "turn prompt"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]
    # an explicit messagesField reads ShareGPT turns too; a system column leads a prompt/response record
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"chat": record["conversations"][1:]}])
    assert load_dataset(chat, Layout("messages", messages_field="chat"), "d") == [to_messages(
        {"messages": record["conversations"][1:]}, Layout(), "r")]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "p", "response": "r", "system": "s"}])
    assert load_dataset(plain, Layout(), "d") == [[{"role": "system", "content": "s"},
                                                    {"role": "user", "content": "p"},
                                                    {"role": "assistant", "content": "r"}]]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(InvalidInput, match=r"bad.jsonl:1: conversations\[0\] needs a role .*human/gpt"):
        load_dataset(bad, Layout(), "d")


def test_messages_with_a_system_turn_through_qwen_template(tmp_path, qwen_tokenizer):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
                          {"role": "assistant", "content": "5"}], "system": "ignored: the turn has its own"}]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    samples, _ = build_samples(spec_for(path), qwen_tokenizer, _resolve)
    text, labelled = decoded(qwen_tokenizer, samples[0])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 3?<|im_end|>\n"
                    "<|im_start|>assistant\n5<|im_end|>\n")
    assert labelled == "5<|im_end|>"


# ---- plain JSONL, folders of mixed layouts, no known layout -----------------------------------------------


def test_a_folder_of_every_layout_trains_together(tmp_path, r1_tokenizer):
    folder = tmp_path / "mixed"
    write_openr1(folder / "a-openr1.parquet", n=2)
    write_openthoughts(folder / "b-openthoughts.parquet", n=2)
    write_jsonl(folder / "c-plain.jsonl", [{"prompt": "1 + 1?", "response": "<think>\n1+1=2\n</think>\n\n2"}])
    samples, stats = build_samples(spec_for(folder), r1_tokenizer, _resolve)
    assert stats.records == 5
    labelled = [decoded(r1_tokenizer, s)[1] for s in samples]
    assert labelled == [openr1_trace(0) + EOS, openr1_trace(1) + EOS, OT_TRACE + EOS, OT_TRACE + EOS,
                        "<think>\n1+1=2\n</think>\n\n2" + EOS]


def test_parquet_with_no_known_layout_names_the_file_and_its_columns(tmp_path, tiny_model):
    data = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer_text": "a"}]), data)
    with pytest.raises(InvalidInput) as err:
        load_dataset(data, Layout(), "spec.data[0]")
    assert str(err.value) == (
        f"spec.data[0]: {data}: no known record layout: expected a 'messages' or 'conversations' column, or "
        f"'prompt' and 'response' columns (columns: question, answer_text)")
    with pytest.raises(InvalidInput, match="expected a 'messages' column"):
        load_dataset(data, Layout("messages"), "spec.data[0]")
    # the stage: exit 2 before any model is loaded, the message in its result
    spec = make_spec(tmp_path, tiny_model, data)
    assert run_stage("sft", spec, tmp_path / "r.json") == 2
    assert "columns: question, answer_text" in json.loads((tmp_path / "r.json").read_text())["error"]


# ---- the shared reader: TeacherGen prompts and Eval benchmarks ---------------------------------------------


def test_readers_that_name_their_fields_skip_the_other_columns(tmp_path):
    path = write_openr1(tmp_path / "openr1.parquet", n=5)
    records = read_records(path, "prompts.dataset", columns=["uuid", "problem", "answer"])
    assert records[4] == {"uuid": "uuid-4", "problem": openr1_rows(5)[4]["problem"], "answer": "8"}
    assert len(read_records(path, "", limit=2, columns=["answer"])) == 2
    # no field the reader named: every column is read, so the reader's own message can list them
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"q": ["1"], "a": ["2"]}), plain)
    assert read_records(plain, "", columns=["question"]) == [{"q": "1", "a": "2"}]
    assert read_records(plain, "") == [{"q": "1", "a": "2"}]  # no column list: everything, as before


# ---- the real stage on an OpenR1-layout Parquet file -------------------------------------------------------


@pytest.mark.slow
def test_stage_trains_on_an_openr1_parquet_file(tmp_path, tiny_model):
    data = write_openr1(tmp_path / "data" / "openr1.parquet", n=8)
    spec = make_spec(tmp_path, tiny_model, data, training={"epochs": 1, "maxSeqLen": 256})
    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["data"][0]["requireTrue"] = "correctness_math_verify"  # as OpenR1 users filter it
    spec.write_text(yaml.safe_dump(doc))
    code, result, output = run_sft(spec)
    assert code == 0, output[-3000:]
    assert result["phase"] == "Succeeded", result.get("error")
    # correctness_math_verify = [i % 3 != 0, False, i % 2 == 0]: rows 3 (none true) is left out
    assert result["metrics"]["samples"] == 7 and result["metrics"]["droppedSamples"] == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
