"""Inputs of examples/04-distillation: an untrained teacher, a smaller student with the same tokenizer, and
worked solutions of three synthetic domains (the quickstart's math, code and science).

    python examples/04-distillation/make_inputs.py [OUT]

OUT defaults to /tmp/branchmerge-examples/04-distillation, where the manifests look. teacher.yaml trains the
teacher on every domain first; the students distill from it.
"""
import json
import sys
from pathlib import Path

from branchmerge.quickstart.domains import DOMAINS, corpus, tasks, user_message
from branchmerge.trainer.tiny import build_tiny_model, build_tokenizer

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/branchmerge-examples") / Path(__file__).parent.name
tokenizer = build_tokenizer(corpus())  # KD compares the two models' distributions token by token: one vocabulary
build_tiny_model(out / "teacher-init", tokenizer=tokenizer, seed=10, hidden_size=128, num_layers=3, num_heads=4)
build_tiny_model(out / "student-init", tokenizer=tokenizer, seed=20, hidden_size=64, num_layers=2, num_heads=2,
                 intermediate_size=128)


def write_solutions(path: Path, solved: list[dict], domain: str) -> None:
    path.write_text("".join(json.dumps({"prompt": user_message(domain, t), "response": t["solution"]}) + "\n"
                            for t in solved))


for domain in DOMAINS:
    solved = tasks(domain, 48, seed=1)
    write_solutions(out / f"{domain}.jsonl", solved, domain)
    if domain == "science":  # a development set of its own, held out of the training data
        write_solutions(out / "science-dev.jsonl", tasks(domain, 8, seed=2, exclude={t["id"] for t in solved}),
                        domain)
print(out)
