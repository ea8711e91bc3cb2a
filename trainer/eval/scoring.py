"""Grade every sample of a benchmark with the shared graders (``branchmerge.trainer.grading``).

Code answers run in the graders' sandbox (a subprocess per test run), so they are graded from a thread pool
sized to the machine: the threads only wait on subprocesses. Math, mcq and exact grading are fast and stay on
the calling thread (math-verify's own timeouts use signals, which only work on the main thread). A sample the
engine rejected (the server refused the request, the prompt did not fit) is not graded: it is wrong, with
the reason ``engine:<code>``.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from .questions import Question

ProgressCallback = Callable[[int, int], None]


def code_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def grade_all(kind: str, questions: Sequence[Question], completions: Sequence[Sequence[Any]],
              code_timeout: float, on_progress: ProgressCallback | None = None) -> list[list[Any]]:
    """Per question, one Verdict per completion (same order)."""
    from ..grading import Verdict, grade

    answers = []
    for q, comps in zip(questions, completions):
        for i, completion in enumerate(comps):
            graded = q.graded[i] if len(q.graded) > 1 else q.graded[0]
            answers.append((completion, graded))
    total = len(answers)
    done = 0

    def one(answer):
        completion, record = answer
        text = completion.text
        if getattr(completion, "rejected", None):  # no answer to grade: wrong, with the engine's reason
            return Verdict(False, f"engine:{completion.rejected}")
        if kind == "code":
            return grade(kind, text, record, timeout_seconds=code_timeout)
        return grade(kind, text, record)

    verdicts: list[Any] = []
    if kind == "code":
        with ThreadPoolExecutor(max_workers=code_workers()) as pool:
            for verdict in pool.map(one, answers):
                verdicts.append(verdict)
                done += 1
                if on_progress:
                    on_progress(done, total)
    else:
        for answer in answers:
            verdicts.append(one(answer))
            done += 1
            if on_progress:
                on_progress(done, total)
    out, cursor = [], 0
    for comps in completions:
        out.append(verdicts[cursor: cursor + len(comps)])
        cursor += len(comps)
    return out
