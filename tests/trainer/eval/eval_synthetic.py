"""Test helper: the synthetic math + mcq + code benchmarks (examples/data/eval-*.jsonl) as an Eval manifest,
and the answers a model must give to score on them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "examples" / "data"
MATH_TEMPLATE = "{{prompt}}\nPlease reason step by step, and put your final answer within \\boxed{}."
MCQ_TEMPLATE = "{{prompt}}\n\n{{choices}}\n\nPut the letter of your final answer within \\boxed{}."
CODE_PROGRAMS = {
    "code-double": "print(2 * int(input()))",
    "code-sum": "a, b = map(int, input().split())\nprint(a + b)",
    "code-max": "print(max(map(int, input().split())))",
    "code-add-fn": "class Solution:\n    def add(self, a, b):\n        return a + b",
}


def benchmarks(data_dir: Path, samples: int = 2, limit: int | None = None) -> list[dict]:
    docs = [
        {"name": "math", "kind": "math", "samples": samples, "template": MATH_TEMPLATE,
         "dataset": {"uri": (data_dir / "eval-math.jsonl").as_uri()}},
        {"name": "mcq", "kind": "mcq", "samples": samples, "template": MCQ_TEMPLATE, "shuffleChoices": True,
         "systemPrompt": "You answer multiple-choice questions.",
         "dataset": {"uri": (data_dir / "eval-mcq.jsonl").as_uri()}},
        {"name": "code", "kind": "code", "samples": samples, "dataset": {"uri": (data_dir / "eval-code.jsonl").as_uri()}},
    ]
    return [{**doc, "limit": limit} for doc in docs] if limit else docs


def copy_data(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("eval-math.jsonl", "eval-mcq.jsonl", "eval-code.jsonl"):
        shutil.copy(DATA / name, dest / name)
    return dest


def write_manifest(path: Path, name: str, model: Path, out: Path, bench: list[dict], engine: dict,
                   max_tokens: int = 64, code_timeout: float = 5) -> Path:
    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Eval", "metadata": {"name": name},
           "spec": {"model": {"uri": model.as_uri()}, "engine": engine, "benchmarks": bench,
                    "sampling": {"temperature": 0.6, "topP": 0.95, "maxTokens": max_tokens, "seed": 0},
                    "codeTimeoutSeconds": code_timeout, "output": {"uri": out.as_uri()}}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def training_pairs(bench: list[dict], seed: int = 0) -> list[tuple[list[dict], str]]:
    """(conversation, answer) for every prompt the Eval will send, built by the stage's own question code."""
    from branchmerge.api.eval import Benchmark
    from branchmerge.api.uris import local_path
    from branchmerge.trainer.eval.data import load_records, question_id
    from branchmerge.trainer.eval.questions import build_question
    from branchmerge.trainer.eval.stage import conversation

    pairs = []
    for doc in bench:
        b = Benchmark.model_validate(doc)
        for i, record in enumerate(load_records(local_path(b.dataset.uri), b.limit)):
            q = build_question(record, question_id(record, i), b, seed)
            for j, prompt in enumerate(q.prompts):
                graded = q.graded[j]
                if b.kind == "math":
                    answer = f"The answer is \\boxed{{{graded['answer']}}}."
                elif b.kind == "mcq":
                    answer = f"\\boxed{{{graded['answer']}}}"
                else:
                    answer = f"```python\n{CODE_PROGRAMS[q.id]}\n```"
                pairs.append((conversation(b, prompt), answer))
    return pairs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
