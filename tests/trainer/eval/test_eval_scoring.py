"""Grading inside the Eval: code answers that reach for the network or never stop are contained and scored
wrong; a correct program still passes; verdicts keep question/sample order."""
from __future__ import annotations

import time

from branchmerge.api.eval import Benchmark
from branchmerge.trainer.engine import Completion
from branchmerge.trainer.eval.aggregate import SampleOutcome, summarize
from branchmerge.trainer.eval.questions import build_question
from branchmerge.trainer.eval.scoring import grade_all

TESTS = [{"input": "3\n", "output": "6\n", "testtype": "stdin"}, {"input": "5\n", "output": "10\n", "testtype": "stdin"}]


def _answer(program: str) -> Completion:
    text = f"Here is my solution.\n```python\n{program}\n```"
    return Completion(text=text, token_ids=None, num_tokens=len(text.split()), finish_reason="stop")


HOSTILE = {
    "network-socket": "import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=2)\nprint(2 * int(input()))",
    "network-http": "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)\nprint(2 * int(input()))",
    "loop": "while True:\n    pass",
    "sleep": "import time\ntime.sleep(600)",
    "fork": "import os\nwhile True:\n    os.fork()",
}


def test_hostile_code_answers_are_contained_and_scored_wrong():
    bench = Benchmark.model_validate({"name": "code", "kind": "code", "samples": 6,
                                      "dataset": {"uri": "file:///unused.jsonl"}})
    q = build_question({"id": "double", "prompt": "Print 2n.", "tests": TESTS}, "double", bench, seed=0)
    completions = [[_answer(p) for p in HOSTILE.values()] + [_answer("print(2 * int(input()))")]]
    seen = []
    started = time.monotonic()
    verdicts = grade_all("code", [q], completions, code_timeout=2, on_progress=lambda d, t: seen.append((d, t)))
    elapsed = time.monotonic() - started
    assert [v.correct for v in verdicts[0]] == [False] * len(HOSTILE) + [True]
    by_name = dict(zip(HOSTILE, verdicts[0]))
    assert by_name["loop"].reason == "timeout" and by_name["sleep"].reason == "timeout"
    assert by_name["network-socket"].reason == "runtime_error" and by_name["network-http"].reason == "runtime_error"
    assert elapsed < 30  # a wall timeout per run, runs in parallel: nothing hangs the stage
    assert seen[-1] == (6, 6)
    outcomes = [[SampleOutcome(bool(v.correct), c.num_tokens, c.truncated) for c, v in zip(completions[0], verdicts[0])]]
    assert summarize(outcomes)["pass1"] == 1 / 6


def test_math_mcq_verdicts_follow_question_and_sample_order():
    math = Benchmark.model_validate({"name": "m", "kind": "math", "samples": 2, "dataset": {"uri": "file:///x.jsonl"}})
    qs = [build_question({"id": i, "prompt": "p", "answer": a}, str(i), math, 0) for i, a in enumerate(["1/2", "3"])]
    comps = [[Completion("\\boxed{0.5}", None, 3, "stop"), Completion("\\boxed{\\frac{1}{3}}", None, 3, "stop")],
             [Completion("so \\boxed{3}", None, 3, "stop"), Completion("no box 3", None, 64, "length")]]
    verdicts = grade_all("math", qs, comps, code_timeout=1)
    assert [[v.correct for v in row] for row in verdicts] == [[True, False], [True, False]]
    assert verdicts[1][1].reason == "no_boxed_answer"
    mcq = Benchmark.model_validate({"name": "g", "kind": "mcq", "samples": 3, "shuffleChoices": True,
                                    "template": "{{prompt}}\n{{choices}}", "dataset": {"uri": "file:///x.jsonl"}})
    q = build_question({"id": "q", "prompt": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1}, "q", mcq, 0)
    comps = [[Completion(f"\\boxed{{{g['answer']}}}", None, 2, "stop") for g in q.graded]]
    comps[0][2] = Completion("\\boxed{" + ("A" if q.graded[2]["answer"] != "A" else "B") + "}", None, 2, "stop")
    assert [v.correct for v in grade_all("mcq", [q], comps, code_timeout=1)[0]] == [True, True, False]


def test_a_sample_the_engine_rejected_is_wrong_ungraded_and_counted():
    from types import SimpleNamespace

    from branchmerge.trainer.eval.stage import LoadedBenchmark, score_benchmark

    math = Benchmark.model_validate({"name": "m", "kind": "math", "samples": 2, "dataset": {"uri": "file:///x.jsonl"}})
    q = build_question({"id": "half", "prompt": "1/2?", "answer": "0.5"}, "half", math, seed=0)
    refused = Completion("", None, 0, "rejected", rejected="http_400", error="HTTP 400: prompt too long")
    summary, rows, tokens = score_benchmark(LoadedBenchmark(math, 0, [q]), [[Completion("\\boxed{0.5}", None, 3, "stop"),
                                                                         refused]],
                                            SimpleNamespace(code_timeout_seconds=2), lambda fraction: None)
    assert summary["pass1"] == 0.5 and summary["rejected"] == 1
    assert summary["reasons"] == {"correct": 1, "engine:http_400": 1}
    sample = rows[0]["samples"][1]
    assert sample["correct"] is False and sample["finishReason"] == "rejected"
    assert sample["rejected"] == "http_400" and sample["error"] == "HTTP 400: prompt too long"
    assert "rejected" not in rows[0]["samples"][0] and tokens == 3
