"""Code answers: take the program from the response and run it against the record's tests in the sandbox.

Test formats accepted (also as a JSON string of any of them):
- stdin/stdout: ``[{"input": "1 2\\n", "output": "3\\n"}, ...]`` or ``{"inputs": [...], "outputs": [...]}``;
- function call: ``{"fn_name": "add", "inputs": [[1, 2], ...], "outputs": [3, ...]}`` -- arguments as a list,
  return values as JSON values. LiveCodeBench's functional encoding also works: each input a string of
  newline-separated JSON arguments and each output a JSON string, either in that dict or as a list of
  ``{"input", "output", "testtype": "functional"}`` with the function name given separately (``fn_name``).
  A top-level ``class Solution`` (LeetCode style) is instantiated and its method called.
Stdout is compared line by line ignoring trailing whitespace, then token by token with a float tolerance.
Tests stop at the first failure.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .sandbox import Limits, run_python
from .text import answer_part
from .verdict import Verdict

FLOAT_TOLERANCE = 1e-6
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)


def extract_program(response: str) -> str | None:
    """The last ```python block of the answer part (else of the whole response, else the last fenced block)."""
    for text in (answer_part(response), response):
        blocks = _FENCE.findall(text)
        python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
        if python:
            return python[-1]
        if blocks:
            return blocks[-1][1]
    return None


@dataclass
class TestSuite:
    style: str  # "stdin" or "functional"
    inputs: list[Any]
    outputs: list[Any]
    fn_name: str | None = None


def _json_args(encoded: str) -> list[Any]:
    return [json.loads(line) for line in encoded.split("\n") if line.strip()]


def parse_tests(tests: Any, fn_name: str | None = None) -> TestSuite:
    """Normalise any accepted test encoding (see the module docstring); ValueError when unusable."""
    if isinstance(tests, str):
        tests = json.loads(tests)
    if isinstance(tests, dict):
        fn_name = tests.get("fn_name") or fn_name
        inputs, outputs = list(tests.get("inputs") or []), list(tests.get("outputs") or [])
    elif isinstance(tests, list):
        if any(isinstance(t, dict) and t.get("testtype") == "functional" for t in tests) and not fn_name:
            raise ValueError("functional tests need fn_name")
        if not any(isinstance(t, dict) and t.get("testtype") == "functional" for t in tests):
            fn_name = None
        inputs = [t["input"] for t in tests]
        outputs = [t["output"] for t in tests]
    else:
        raise ValueError(f"unsupported tests value of type {type(tests).__name__}")
    if not inputs or len(inputs) != len(outputs):
        raise ValueError("tests need as many inputs as outputs (and at least one)")
    if fn_name is None:
        if not all(isinstance(x, str) for x in inputs + outputs):
            raise ValueError("stdin/stdout tests need string inputs and outputs")
        return TestSuite("stdin", inputs, outputs)
    args, expected = [], []
    for given, want in zip(inputs, outputs):
        if isinstance(given, str):  # LiveCodeBench encoding: JSON lines in, JSON out
            args.append(_json_args(given))
            expected.append(json.loads(want) if isinstance(want, str) else want)
        else:
            args.append(list(given) if isinstance(given, (list, tuple)) else [given])
            expected.append(want)
    return TestSuite("functional", args, expected, fn_name)


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or math.isclose(a, b, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b


def stdout_matches(actual: str, expected: str) -> bool:
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.strip().splitlines()]

    if lines(actual) == lines(expected):
        return True
    got, want = actual.split(), expected.split()
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if g == w:
            continue
        try:
            if not math.isclose(float(g), float(w), rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE):
                return False
        except ValueError:
            return False
    return True


def run_tests(program: str, suite: TestSuite, limits: Limits) -> Verdict:
    if suite.style == "stdin":
        for i, (given, want) in enumerate(zip(suite.inputs, suite.outputs)):
            res = run_python(program, stdin=given, limits=limits)
            if res.timed_out:
                return Verdict(False, "timeout", program)
            if res.returncode != 0:
                return Verdict(False, "runtime_error", program)
            if not stdout_matches(res.stdout, want):
                return Verdict(False, "wrong_answer", program)
        return Verdict(True, "correct", program)
    res = run_python(program, limits=limits, fn_name=suite.fn_name, cases=suite.inputs)
    if res.results and "error" in res.results[0] and "ok" not in res.results[0]:
        return Verdict(False, "runtime_error", program)  # the program itself failed to load
    for i, want in enumerate(suite.outputs):
        if i >= len(res.results):
            return Verdict(False, "timeout" if res.timed_out else "runtime_error", program)
        case = res.results[i]
        if not case.get("ok"):
            return Verdict(False, "timeout" if case.get("timeout") else "runtime_error", program)
        if not _close(case.get("value"), want):
            return Verdict(False, "wrong_answer", program)
    return Verdict(True, "correct", program)


def grade_code(response: str, tests: Any, *, fn_name: str | None = None, limits: Limits | None = None) -> Verdict:
    if tests is None:
        return Verdict(None, "no_tests", None)
    try:
        suite = parse_tests(tests, fn_name)
    except (ValueError, KeyError, TypeError) as err:
        return Verdict(None, f"bad_tests:{type(err).__name__}", None)
    program = extract_program(response)
    if program is None or not program.strip():
        return Verdict(False, "no_code", None)
    return run_tests(program, suite, limits or Limits())
