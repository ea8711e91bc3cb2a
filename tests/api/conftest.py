"""Shared by the contract tests: a small valid manifest of each kind, for a test to mutate.

``valid`` is a plain function, not a fixture: the tables of invalid cases are built from it when the
tests are collected."""
from __future__ import annotations

import copy

from tests.conftest import API_VERSION as API

VALID = {
    "TeacherGen": {
        "apiVersion": API, "kind": "TeacherGen", "metadata": {"name": "traces"},
        "spec": {
            "teacher": {"model": {"uri": "file:///models/teacher"}},
            "prompts": {"dataset": {"uri": "file:///data/prompts.jsonl"}},
            "verify": {"kind": "math", "answerField": "answer"},
            "select": {"mode": "first-correct"},
        },
    },
    "BranchSFT": {
        "apiVersion": API, "kind": "BranchSFT", "metadata": {"name": "math"},
        "spec": {
            "base": {"uri": "hf://org/student@main", "allowPatterns": ["*.safetensors", "*.json", "tokenizer*"]},
            "data": [{"from": {"kind": "TeacherGen", "name": "traces"}}],
            "training": {"globalBatchSize": 8, "microBatchSize": 2},
        },
    },
    "Merge": {
        "apiVersion": API, "kind": "Merge", "metadata": {"name": "merged"},
        "spec": {
            "method": "ties",
            "base": {"uri": "pvc://models/base"},
            "models": [{"from": {"kind": "BranchSFT", "name": "math"}, "density": 0.5},
                       {"uri": "s3://bucket/code", "density": 0.5, "weight": 2}],
        },
    },
    "Eval": {
        "apiVersion": API, "kind": "Eval", "metadata": {"name": "bench"},
        "spec": {
            "model": {"from": {"kind": "Merge", "name": "merged"}},
            "benchmarks": [{"name": "aime24", "kind": "math", "samples": 4,
                            "dataset": {"uri": "file:///data/aime24.jsonl"}}],
        },
    },
    "MergeSearch": {
        "apiVersion": API, "kind": "MergeSearch", "metadata": {"name": "pick"},
        "spec": {
            "base": {"uri": "pvc://models/base"},
            "branches": [{"name": "math", "model": {"from": {"kind": "BranchSFT", "name": "math"}},
                          "benchmark": "math-dev"},
                         {"name": "code", "model": {"uri": "s3://bucket/code"}, "benchmark": "code-dev"}],
            "space": [{"method": "ties", "parameters": {"density": {"values": [0.3, 0.6]}}},
                      {"method": "linear", "weights": {"math": {"min": 0.5, "max": 1.0, "step": 0.25}}},
                      {"method": "arcee_fusion", "orders": [["math", "code"]]}],
            "budget": {"maxTrials": 6, "parallelism": 2},
            "objective": {"name": "worstRetainedGain", "constraints": {"aboveBase": True}},
            "eval": {"benchmarks": [{"name": "math-dev", "kind": "math", "dataset": {"uri": "file:///data/math-dev.jsonl"}},
                                    {"name": "code-dev", "kind": "code", "dataset": {"uri": "file:///data/code-dev.jsonl"}}]},
        },
    },
}


def valid(kind: str) -> dict:
    return copy.deepcopy(VALID[kind])
