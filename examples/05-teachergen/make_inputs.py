"""Inputs of examples/05-teachergen: an untrained tiny teacher, worked solutions to teach it, and the
questions to ask it (with their reference answers, for the verifier).

    python examples/05-teachergen/make_inputs.py [OUT]

OUT defaults to /tmp/branchmerge-examples/05-teachergen, where the manifests look. The questions are the
quickstart's synthetic arithmetic ("Compute 7-4+2."); the teacher is taught the first ones among its
solutions, a stand-in for a large model that can already solve them.
"""
import json
import sys
from pathlib import Path

from branchmerge.quickstart.domains import corpus, tasks, user_message
from branchmerge.trainer.tiny import build_tiny_model, build_tokenizer

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/branchmerge-examples") / Path(__file__).parent.name
build_tiny_model(out / "teacher-init", tokenizer=build_tokenizer(corpus()), seed=10)
solved = tasks("math", 128, seed=1)
with open(out / "solutions.jsonl", "w") as f:
    for t in solved:
        f.write(json.dumps({"prompt": user_message("math", t), "response": t["solution"]}) + "\n")
with open(out / "questions.jsonl", "w") as f:
    for t in solved[:16]:
        f.write(json.dumps({"id": t["id"], "problem": t["prompt"], "answer": t["answer"]}) + "\n")
print(out)
