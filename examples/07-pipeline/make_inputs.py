"""Inputs of examples/07-pipeline: untrained tiny teacher and student models with one tokenizer, worked
solutions (math for the teacher, science for the science branch), math questions for the teacher, and
held-out math and science questions for the final Eval. The domains are the quickstart's synthetic ones.

    python examples/07-pipeline/make_inputs.py [OUT]

OUT defaults to /tmp/branchmerge-examples/07-pipeline, where the manifests look.
"""
import json
import sys
from pathlib import Path

from branchmerge.quickstart.domains import corpus, tasks, user_message
from branchmerge.trainer.tiny import build_tiny_model, build_tokenizer

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/branchmerge-examples") / Path(__file__).parent.name
tokenizer = build_tokenizer(corpus())
build_tiny_model(out / "teacher-init", tokenizer=tokenizer, seed=10)
build_tiny_model(out / "student-init", tokenizer=tokenizer, seed=20, hidden_size=96, num_heads=3,
                 intermediate_size=192)


def write_jsonl(name: str, records: list[dict]) -> None:
    (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def question(t: dict) -> dict:  # what TeacherGen and Eval read: the question and the grader's reference
    return {k: t[k] for k in ("id", "prompt", "answer", "choices") if k in t}


math, science = tasks("math", 128, seed=1), tasks("science", 64, seed=1)
write_jsonl("math-solutions.jsonl", [{"prompt": user_message("math", t), "response": t["solution"]} for t in math])
write_jsonl("math-questions.jsonl", [question(t) for t in math[:24]])  # ones the teacher was taught
write_jsonl("science-solutions.jsonl", [{"prompt": user_message("science", t), "response": t["solution"]}
                                        for t in science])
seen = {t["id"] for t in math + science}
write_jsonl("math-eval.jsonl", [question(t) for t in tasks("math", 8, seed=3, exclude=seen)])
write_jsonl("science-eval.jsonl", [question(t) for t in tasks("science", 8, seed=3, exclude=seen)])
print(out)
