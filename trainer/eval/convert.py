"""Convert the public layouts of AIME 2024, GPQA-Diamond and LiveCodeBench (code_generation_lite) into this
project's benchmark JSONL (docs/eval-data.md). Runs offline on files the user already has.

LiveCodeBench ships most private tests as base64(zlib(pickle(json text))). Unpickling untrusted data can run
arbitrary code, so ``pickled_text`` never calls ``pickle.loads``: it walks the opcodes with
``pickletools.genops`` (a parser, it executes nothing) and accepts only a pickle whose whole content is one
string; anything else (globals, reduce, containers) is rejected.
"""
from __future__ import annotations

import base64
import binascii
import csv
import json
import pickletools
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

from .prompts import LETTERS, shuffled_order

MAX_DECOMPRESSED = 1 << 30  # bytes one compressed test-case blob may expand to (guards against zip bombs)


class ConvertError(ValueError):
    """The input does not have the expected layout (the message names the file, row and column)."""


# ---- reading the public files ----------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    """Rows of a .parquet, .jsonl, .json (list) or .csv file, or of every such file in a folder."""
    path = Path(path)
    if path.is_dir():
        rows: list[dict] = []
        for file in sorted(path.iterdir()):
            if file.suffix in (".parquet", ".jsonl", ".json", ".csv") and not file.name.startswith((".", "_")):
                rows += read_rows(file)
        return rows
    if not path.exists():
        raise ConvertError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"train": [...]} style dumps
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        if not isinstance(data, list):
            raise ConvertError(f"{path}: expected a JSON list of rows")
        return data
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as err:
                        raise ConvertError(f"{path}:{line_no}: invalid JSON ({err})") from None
        return rows
    raise ConvertError(f"{path}: unsupported input (expected .parquet, .jsonl, .json or .csv)")


def column(row: dict, names: Iterable[str], where: str, required: bool = True) -> Any:
    """The first present column among ``names``, matched case- and separator-insensitively."""
    names = list(names)
    folded = {str(k).lower().replace(" ", "_").replace("-", "_"): k for k in row}
    for name in names:
        key = folded.get(name.lower().replace(" ", "_").replace("-", "_"))
        if key is not None and row[key] is not None and row[key] != "":
            return row[key]
    if required:
        raise ConvertError(f"{where}: missing column {names[0]!r} (have: {', '.join(map(str, row))})")
    return None


def _clean(text: Any) -> str:
    return str(text).strip()


# ---- AIME ------------------------------------------------------------------------------------------


def _answer_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = _clean(value)
    try:  # "204.0" in CSV exports
        number = float(text)
        if number.is_integer() and "." in text and text.replace(".", "", 1).lstrip("-").isdigit():
            return str(int(number))
    except ValueError:
        pass
    return text


def convert_aime(rows: list[dict], source: str = "aime") -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        qid = column(row, ["ID", "id", "problem_id", "url"], where, required=False)
        out.append({
            "id": _clean(qid) if qid is not None else str(i),
            "prompt": _clean(column(row, ["Problem", "problem", "question"], where)),
            "answer": _answer_text(column(row, ["Answer", "answer", "final_answer"], where)),
        })
    return out


# ---- GPQA ------------------------------------------------------------------------------------------


def convert_gpqa(rows: list[dict], seed: int = 0, source: str = "gpqa") -> list[dict]:
    """Options are shuffled once per question (seeded by id): the public files always list the correct one first."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        qid = _clean(column(row, ["Record ID", "record_id", "id"], where, required=False) or i)
        options = [_clean(column(row, ["Correct Answer"], where))]
        options += [_clean(column(row, [f"Incorrect Answer {j}"], where)) for j in (1, 2, 3)]
        order = shuffled_order(len(options), "gpqa", seed, qid)
        out.append({
            "id": qid,
            "prompt": _clean(column(row, ["Question"], where)),
            "choices": [options[j] for j in order],
            "answer": LETTERS[order.index(0)],
            **({"domain": _clean(d)} if (d := column(row, ["High-level domain"], where, required=False)) else {}),
        })
    return out


# ---- LiveCodeBench ---------------------------------------------------------------------------------

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_HARMLESS_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"}


def pickled_text(data: bytes) -> str:
    """The string inside a pickle that holds exactly one string, parsed without executing the pickle."""
    strings = []
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            if opcode.name in _STRING_OPS:
                strings.append(arg)
            elif opcode.name not in _HARMLESS_OPS:
                raise ConvertError(f"refusing a pickle with opcode {opcode.name} (only a plain string is accepted)")
    except ValueError as err:
        raise ConvertError(f"malformed pickle ({err})") from None
    if len(strings) != 1:
        raise ConvertError(f"expected a pickle of one string, found {len(strings)} strings")
    return strings[0]


def _inflate(blob: bytes) -> bytes:
    inflater = zlib.decompressobj()
    data = inflater.decompress(blob, MAX_DECOMPRESSED)
    if inflater.unconsumed_tail:
        raise ConvertError(f"compressed test cases expand beyond {MAX_DECOMPRESSED} bytes")
    return data


def decode_test_cases(value: Any, where: str) -> list[dict]:
    """LiveCodeBench test cases: a JSON list (or its text), or base64(zlib(pickle(JSON text)))."""
    if value is None or value == "":
        return []
    if isinstance(value, list):
        cases = value
    else:
        text = value.decode() if isinstance(value, bytes) else str(value)
        try:
            cases = json.loads(text)
        except ValueError:
            try:
                cases = json.loads(pickled_text(_inflate(base64.b64decode(text, validate=False))))
            except (binascii.Error, zlib.error, ValueError) as err:
                raise ConvertError(f"{where}: test cases are neither JSON nor base64+zlib+pickle ({err})") from None
    if not isinstance(cases, list):
        raise ConvertError(f"{where}: test cases must be a list")
    tests = []
    for j, case in enumerate(cases):
        if not isinstance(case, dict) or "input" not in case or "output" not in case:
            raise ConvertError(f"{where}: test {j} needs input and output")
        testtype = case.get("testtype", "stdin")
        if testtype not in ("stdin", "functional"):
            raise ConvertError(f"{where}: test {j}: unknown testtype {testtype!r}")
        tests.append({"input": str(case["input"]), "output": str(case["output"]), "testtype": testtype})
    return tests


CODE_INSTRUCTIONS_STDIN = (
    "Write a Python 3 program that reads the input from standard input and writes the answer to standard "
    "output. Return the complete program in one ```python code block."
)
CODE_INSTRUCTIONS_STARTER = (
    "Complete the following starter code in Python 3 and return the complete solution in one ```python code "
    "block.\n\n```python\n{starter}\n```"
)


def code_prompt(question: str, starter_code: str) -> str:
    if starter_code.strip():
        return f"{question}\n\n{CODE_INSTRUCTIONS_STARTER.format(starter=starter_code.rstrip())}"
    return f"{question}\n\n{CODE_INSTRUCTIONS_STDIN}"


def convert_livecodebench(rows: list[dict], since: str | None = None, until: str | None = None,
                          source: str = "livecodebench") -> list[dict]:
    """``since``/``until`` (ISO dates, inclusive/exclusive) filter by contest_date like TinyR1's 2024-08..2025-02."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        date = _clean(column(row, ["contest_date"], where, required=False) or "")[:10]
        if (since and (not date or date < since)) or (until and (not date or date >= until)):
            continue
        qid = _clean(column(row, ["question_id", "id"], where, required=False) or i)
        question = _clean(column(row, ["question_content", "question"], where))
        starter = str(column(row, ["starter_code"], where, required=False) or "")
        metadata = column(row, ["metadata"], where, required=False) or {}
        if isinstance(metadata, str):
            try:
                metadata = json.loads(metadata) if metadata.strip() else {}
            except ValueError:
                raise ConvertError(f"{where}: metadata is not JSON") from None
        tests = decode_test_cases(column(row, ["public_test_cases"], where, required=False), f"{where} public")
        tests += decode_test_cases(column(row, ["private_test_cases"], where, required=False), f"{where} private")
        if not tests:
            raise ConvertError(f"{where}: no test cases")
        fn_name = metadata.get("func_name") if isinstance(metadata, dict) else None
        if any(t["testtype"] == "functional" for t in tests) and not fn_name:
            raise ConvertError(f"{where}: functional tests need metadata.func_name")
        record = {"id": qid, "prompt": code_prompt(question, starter), "question": question, "tests": tests}
        if fn_name:
            record["fn_name"] = fn_name
        if starter.strip():
            record["starter_code"] = starter
        for key in ("platform", "difficulty", "contest_date"):
            if (v := column(row, [key], where, required=False)) is not None:
                record[key] = _clean(v)
        out.append(record)
    return out


CONVERTERS: dict[str, Callable[..., list[dict]]] = {
    "aime": convert_aime,
    "gpqa": convert_gpqa,
    "livecodebench": convert_livecodebench,
}
