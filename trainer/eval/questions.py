"""From benchmark records to the prompts sent to the model and the references each sample is graded against.

A question normally has one prompt sampled k times (one request with n = k). With ``shuffleChoices`` every
sample sees its own seeded order of the options, so it has its own prompt and its own reference letter.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ...api.eval import Benchmark
from ..grading import function_name, grade
from .prompts import LETTERS, TemplateError, lettered, mcq_view, reference_index, render, shuffled_order

MAX_CHOICES = len(LETTERS)
MAX_INLINE_TESTS = 256 << 10  # bytes of JSON; bigger tests are saved as a digest


class QuestionError(ValueError):
    """A record cannot be turned into a question (message names the field)."""


@dataclass
class Question:
    id: str
    record: dict[str, Any]
    """What the grader sees: the original fields plus canonical ``answer``/``choices``/``tests`` keys."""
    prompts: list[str]
    """One user message, or one per sample when options are shuffled."""
    graded: list[dict[str, Any]] = field(default_factory=list)
    """Per prompt: the record as graded (mcq: the options as shown and the remapped reference letter)."""
    orders: list[list[int]] | None = None
    """mcq with shuffling: the original option index at each shown position, per sample."""


def canonical_record(record: dict, benchmark: Benchmark) -> dict:
    """The record with the spec's field names mapped to the canonical ones the graders read."""
    fields = benchmark.fields
    out = dict(record)
    for canonical, source in (("answer", fields.answer), ("choices", fields.choices), ("tests", fields.tests)):
        if source in record:
            out[canonical] = record[source]
    return out


def _require(record: dict, key: str, source: str) -> Any:
    value = record.get(key)
    if value is None or value == "" or value == []:
        raise QuestionError(f"field {source!r} is missing or empty")
    return value


def graded_record(record: dict, benchmark: Benchmark) -> dict:
    """The canonical record the grader reads (options in dataset order, mcq reference as a letter); checks
    that the fields the kind needs are usable (QuestionError)."""
    rec = canonical_record(record, benchmark)
    if benchmark.kind in ("math", "exact"):
        rec["answer"] = str(_require(rec, "answer", benchmark.fields.answer))
    elif benchmark.kind == "code":
        _require(rec, "tests", benchmark.fields.tests)
        # an empty answer runs nothing: the grader only parses the tests, so bad tests fail before generation
        probe = grade("code", "", rec)
        if probe.correct is None:
            raise QuestionError(f"field {benchmark.fields.tests!r}: unusable tests ({probe.reason}; "
                                f"see docs/eval-data.md)")
    elif benchmark.kind == "mcq":
        choices = _require(rec, "choices", benchmark.fields.choices)
        if not isinstance(choices, list) or not 2 <= len(choices) <= MAX_CHOICES:
            raise QuestionError(f"field {benchmark.fields.choices!r} must be a list of 2 to {MAX_CHOICES} options")
        choices = [str(c) for c in choices]
        try:
            correct = reference_index(_require(rec, "answer", benchmark.fields.answer), choices)
        except ValueError as err:
            raise QuestionError(f"field {benchmark.fields.answer!r}: {err}") from None
        rec.update(choices=choices, answer=LETTERS[correct])
    return rec


def build_question(record: dict, qid: str, benchmark: Benchmark, seed: int) -> Question:
    rec = graded_record(record, benchmark)
    values = dict(record)
    if benchmark.kind != "mcq":
        prompt = _render(benchmark.template, values)
        return Question(qid, rec, [prompt], [rec])

    choices = rec["choices"]
    correct = LETTERS.index(rec["answer"])
    if not benchmark.shuffle_choices:
        values["choices"] = lettered(choices)
        return Question(qid, rec, [_render(benchmark.template, values)], [rec])
    question = Question(qid, rec, [], [], [])
    for sample in range(benchmark.samples):
        order = shuffled_order(len(choices), seed, benchmark.name, qid, sample)
        text, letter, order = mcq_view(choices, correct, order)
        values["choices"] = text
        question.prompts.append(_render(benchmark.template, values))
        question.graded.append({**rec, "choices": [choices[i] for i in order], "answer": letter})
        question.orders.append(order)  # type: ignore[union-attr]
    return question


def tests_digest(tests: Any) -> str:
    """Identity of a code question's tests (what a record holds instead of tests too big to copy)."""
    return "sha256:" + hashlib.sha256(json.dumps(tests, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def grading_material(kind: str, rec: dict) -> dict[str, Any]:
    """What the grader reads of a question, saved in its Eval record so the samples can be re-graded later
    without the dataset (trainer/eval/rescore.py). Tests above MAX_INLINE_TESTS bytes (LiveCodeBench's
    hidden tests reach megabytes per question) are saved as their digest: re-grading then reads them from
    the dataset and checks the digest."""
    if kind == "code":
        tests = rec.get("tests")
        size = len(json.dumps(tests, ensure_ascii=False))
        out: dict[str, Any] = {"tests": tests} if size <= MAX_INLINE_TESTS else {"testsDigest": tests_digest(tests)}
        name = function_name(rec)
        if name:
            out["fnName"] = name
        return out
    if kind == "mcq":
        return {"answer": rec.get("answer"), "choices": rec.get("choices")}
    return {"answer": rec.get("answer")}


def material_record(material: dict[str, Any]) -> dict[str, Any]:
    """The record the grader reads, from saved grading material (inverse of :func:`grading_material`)."""
    rec = {k: v for k, v in material.items() if k in ("answer", "choices", "tests")}
    if material.get("fnName"):
        rec["fn_name"] = material["fnName"]
    return rec


def _render(template: str, values: dict) -> str:
    try:
        return render(template, values)
    except TemplateError as err:
        raise QuestionError(str(err)) from None
