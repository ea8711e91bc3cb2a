"""Per-benchmark scores from per-question sample verdicts (the TinyR1 protocol: pass@1 averaged over k samples).

- pass@1 = mean over questions of (correct samples / samples), i.e. the mean over all k x questions samples;
- stderr = standard error of that mean over questions (each question's c/k is one observation);
- pass@k for k = 1..samples with the unbiased estimator, averaged over questions;
- output length: mean and p95 of generated tokens over all samples, and the share cut by max_tokens.
All scores are fractions in [0, 1]; tables print them as percentages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .passk import mean, pass_at_k, percentile, standard_error


@dataclass(frozen=True)
class SampleOutcome:
    correct: bool
    num_tokens: int
    truncated: bool


def summarize(questions: Sequence[Sequence[SampleOutcome]]) -> dict:
    """Scores of one benchmark; ``questions`` holds each question's samples (at least one each)."""
    if not questions:
        raise ValueError("no questions to summarize")
    if any(not samples for samples in questions):
        raise ValueError("every question needs at least one sample")
    per_question = [sum(s.correct for s in samples) / len(samples) for samples in questions]
    max_k = min(len(samples) for samples in questions)
    pass_k = {
        str(k): mean([pass_at_k(len(samples), sum(s.correct for s in samples), k) for samples in questions])
        for k in range(1, max_k + 1)
    }
    every_sample = [s for samples in questions for s in samples]
    tokens = [s.num_tokens for s in every_sample]
    return {
        "pass1": mean(per_question),
        "stderr": standard_error(per_question),
        "passAtK": pass_k,
        "n": len(questions),
        "samples": max_k,
        "correct": sum(s.correct for s in every_sample),
        "meanTokens": mean(tokens),
        "p95Tokens": percentile(tokens, 95),
        "truncated": mean([float(s.truncated) for s in every_sample]),
    }


def overall_score(benchmarks: Iterable[dict]) -> float:
    """The headline number (status printer column Score): mean pass@1 over benchmarks, each weighted equally."""
    return mean([b["pass1"] for b in benchmarks])
