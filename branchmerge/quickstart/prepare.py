"""The quickstart's inputs, made here instead of downloaded: datasets of the three domains and two tiny
untrained models (a larger teacher, a smaller student) sharing one tokenizer trained on the domains' text.

    <root>/models/teacher-init, <root>/models/student-init      Qwen2 folders from branchmerge.trainer.tiny
    <root>/data/qs-<domain>-solutions.jsonl                      worked solutions the teacher first learns
    <root>/data/qs-<domain>-prompts.jsonl                        prompts TeacherGen answers (with references)
    <root>/data/qs-<domain>-eval.jsonl                           held-out questions for the final Evals (test split)
    <root>/data/qs-<domain>-dev.jsonl                            other held-out questions: the MergeSearch's dev split
    <root>/data/qs-general.jsonl                                 a little of everything: the student's "pretraining"
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .domains import DOMAINS, corpus, tasks, user_message


@dataclass(frozen=True)
class Sizes:
    """How much data: ``full`` for the README's run, ``reduced`` for the CI smoke test."""

    teacher_solutions: int  # per domain
    prompts: int  # per domain, for TeacherGen
    eval_questions: int  # per domain
    dev_questions: int  # per domain: the MergeSearch scores its trials on these, never on the final Evals'
    general: dict  # per domain: the backbone's "pretraining" mix


SIZES = {
    # The full mix makes a middling backbone on all three: math needs many examples to be learnt at all, code
    # few (with more, the backbone already solves code and leaves the code branch nothing to add), and science
    # knows part of its 96 items. The backbone is mostly what the
    # merge keeps (TinyR1's regime: a strong backbone, small branch updates) -- README has every mix measured.
    "full": Sizes(teacher_solutions=640, prompts=320, eval_questions=50, dev_questions=30,
                  general={"math": 400, "code": 60, "science": 170}),
    "reduced": Sizes(teacher_solutions=200, prompts=40, eval_questions=16, dev_questions=8,
                     general={"math": 30, "code": 30, "science": 30}),
}

# Sized for 2 CPU cores: the teacher (~0.53M parameters) is 1.6x the student (~0.33M; most of both is the
# embeddings) and learns from 3x as many worked solutions as the student's backbone.
TEACHER = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256)
STUDENT = dict(hidden_size=96, num_layers=2, num_heads=3, intermediate_size=192)
VOCAB = 768  # every science item but "acetylene" one token (the tokenizer stops at ~720 merges; 640 left 77 split)
DONE = ".prepared"


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def _chat(domain: str, task: dict) -> dict:
    return {"prompt": user_message(domain, task), "response": task["solution"], "domain": domain}


def _question(domain: str, task: dict) -> dict:
    """A record for TeacherGen and Eval: the rendered question plus the grader's reference fields."""
    record = {"id": task["id"], "prompt": task["prompt"], "question": user_message(domain, task), "domain": domain}
    for key in ("answer", "choices", "tests"):
        if key in task:
            record[key] = task[key]
    return record


def prepare(root: str | Path, size: str = "full", seed: int = 0) -> Path:
    """Write everything under ``root`` (idempotent: a finished preparation of the same size is kept)."""
    root = Path(root).resolve()
    marker = root / DONE
    # everything that shapes the inputs: a change rebuilds them (and the runner's cache then reruns what used them)
    wanted = json.dumps({"size": size, "seed": seed, "version": 8, "sizes": SIZES[size].__dict__,
                         "teacher": TEACHER, "student": STUDENT, "vocab": VOCAB})
    if marker.exists() and marker.read_text() == wanted:
        return root
    sizes = SIZES[size]
    data, models = root / "data", root / "models"
    data.mkdir(parents=True, exist_ok=True)
    models.mkdir(parents=True, exist_ok=True)

    general = []
    for domain in DOMAINS:
        held_out = tasks(domain, sizes.eval_questions, seed + 3)
        dev = tasks(domain, sizes.dev_questions, seed + 5, exclude={t["id"] for t in held_out})
        held_ids = {t["id"] for t in held_out + dev}  # neither split is trained on
        _write_jsonl(data / f"qs-{domain}-eval.jsonl", [_question(domain, t) for t in held_out])
        _write_jsonl(data / f"qs-{domain}-dev.jsonl", [_question(domain, t) for t in dev])
        prompts = tasks(domain, sizes.prompts, seed + 2, exclude=held_ids)
        _write_jsonl(data / f"qs-{domain}-prompts.jsonl", [_question(domain, t) for t in prompts])
        taught = tasks(domain, sizes.teacher_solutions, seed + 1, exclude=held_ids)
        _write_jsonl(data / f"qs-{domain}-solutions.jsonl", [_chat(domain, t) for t in taught])
        general += [_chat(domain, t) for t in tasks(domain, sizes.general[domain], seed + 4, exclude=held_ids)]
    _write_jsonl(data / "qs-general.jsonl", general)

    from branchmerge.trainer.tiny import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer(corpus(seed), vocab_size=VOCAB)
    build_tiny_model(models / "teacher-init", tokenizer=tokenizer, seed=seed + 10, **TEACHER)
    build_tiny_model(models / "student-init", tokenizer=tokenizer, seed=seed + 20, **STUDENT)
    marker.write_text(wanted)
    return root
