import base64
import csv
import json
import os
import pickle
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from branchmerge.cli import main
from branchmerge.trainer.eval.convert import ConvertError, decode_test_cases, pickled_text
from branchmerge.trainer.eval.data import load_records


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_convert_aime_parquet(tmp_path, capsys):
    src = tmp_path / "aime.parquet"
    pq.write_table(pa.table({"ID": ["2024-I-1", "2024-I-2"], "Problem": ["Find $x$.", " Find $y$. "],
                             "Solution": ["...", "..."], "Answer": [204, 25]}), src)
    assert main(["convert", "aime", str(src), str(tmp_path / "out.jsonl")]) == 0
    assert _jsonl(tmp_path / "out.jsonl") == [{"id": "2024-I-1", "prompt": "Find $x$.", "answer": "204"},
                                              {"id": "2024-I-2", "prompt": "Find $y$.", "answer": "25"}]
    assert "2 aime records" in capsys.readouterr().out
    assert len(load_records(tmp_path / "out.jsonl")) == 2  # the stage reads what the converter writes


def test_convert_gpqa_csv_shuffles_options_with_the_right_letter(tmp_path):
    src = tmp_path / "gpqa_diamond.csv"
    cols = ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
            "Incorrect Answer 3", "High-level domain"]
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i in range(12):
            w.writerow([f"rec{i}", f"Question {i}?", f"right {i}\n", f"wrong a{i}", f"wrong b{i}", f"wrong c{i}",
                        "Physics"])
    assert main(["convert", "gpqa", str(src), str(tmp_path / "out.jsonl")]) == 0
    records = _jsonl(tmp_path / "out.jsonl")
    letters = set()
    for i, r in enumerate(records):
        assert r["id"] == f"rec{i}" and r["prompt"] == f"Question {i}?" and r["domain"] == "Physics"
        assert len(r["choices"]) == 4
        assert r["choices"]["ABCD".index(r["answer"])] == f"right {i}"
        letters.add(r["answer"])
    assert len(letters) > 1  # the correct option is not always first
    assert main(["convert", "gpqa", str(src), str(tmp_path / "again.jsonl")]) == 0
    assert _jsonl(tmp_path / "again.jsonl") == records  # deterministic


def _compressed(cases) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def test_convert_livecodebench_decodes_compressed_private_tests_and_filters_dates(tmp_path):
    rows = [
        {"question_id": "abc301_a", "question_title": "Sum", "question_content": "Read two ints, print the sum.",
         "platform": "atcoder", "contest_date": "2024-09-01T00:00:00", "starter_code": "", "difficulty": "easy",
         "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
         "private_test_cases": _compressed([{"input": "5 6\n", "output": "11\n", "testtype": "stdin"}]),
         "metadata": "{}"},
        {"question_id": "lc-1", "question_content": "Return a+b.", "platform": "leetcode",
         "contest_date": "2024-12-01T00:00:00", "starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        ",
         "public_test_cases": json.dumps([{"input": "1\n2", "output": "3", "testtype": "functional"}]),
         "private_test_cases": json.dumps([{"input": "4\n5", "output": "9", "testtype": "functional"}]),
         "metadata": json.dumps({"func_name": "add"})},
        {"question_id": "old", "question_content": "old", "contest_date": "2023-01-01T00:00:00",
         "public_test_cases": "[]", "private_test_cases": "[]", "metadata": "{}"},
    ]
    src = tmp_path / "lcb.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["convert", "livecodebench", str(src), str(out), "--since", "2024-08-01", "--until", "2025-02-01"]) == 0
    stdin_rec, fn_rec = _jsonl(out)
    assert stdin_rec["id"] == "abc301_a" and stdin_rec["platform"] == "atcoder"
    assert stdin_rec["tests"] == [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
                                  {"input": "5 6\n", "output": "11\n", "testtype": "stdin"}]
    assert "standard input" in stdin_rec["prompt"] and "fn_name" not in stdin_rec
    assert fn_rec["fn_name"] == "add" and "def add" in fn_rec["prompt"] and len(fn_rec["tests"]) == 2


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    blob = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(ConvertError, match="opcode"):
        decode_test_cases(blob, "row 0")
    assert not marker.exists()
    with pytest.raises(ConvertError):
        pickled_text(pickle.dumps(["a", "b"]))
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert pickled_text(pickle.dumps("héllo [1]", protocol=protocol)) == "héllo [1]"


def test_convert_errors_name_the_row_and_column(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"Question": "q", "Correct Answer": "a"}) + "\n")
    assert main(["convert", "gpqa", str(src), str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "row 0" in err and "Incorrect Answer 1" in err
    assert not (tmp_path / "o.jsonl").exists()
    assert main(["convert", "aime", str(tmp_path / "missing.parquet"), str(tmp_path / "o.jsonl")]) == 2
