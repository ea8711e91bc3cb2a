"""Three synthetic domains whose answers a program can check, standing in for TinyR1's math, code and
science. Each task comes with a worked solution (what the teacher is first taught) and with the fields
the graders need (``answer`` for math and mcq, ``tests`` for code).

- math: two-step arithmetic on single digits, solved step by step, final answer in \\boxed{} (math grading);
- code: "write f(x) that returns x times 3 plus 4" -> a fenced Python function, checked by running tests;
- science: which category (metal, gas, mammal, bird: fixed options) an item belongs to -> a letter (mcq grading).
The vocabularies barely overlap, so each branch's fine-tuning moves mostly its own embedding rows (how
Arcee Fusion treats that, and what it keeps of each branch, is measured in examples/quickstart/README.md).
"""
from __future__ import annotations

import random

DOMAINS = ("math", "code", "science")

# ---- math ----------------------------------------------------------------------------------------------

def math_task(rng: random.Random) -> dict:
    while True:
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        op1, op2 = rng.choice("+-"), rng.choice("+-")
        first = a + b if op1 == "+" else a - b
        final = first + c if op2 == "+" else first - c
        # every number a single digit: the tokenizer splits digits, and a two-layer model that must carry
        # into a second digit got only about a third of the sums right (measured)
        if 0 <= first <= 9 and 0 <= final <= 9:
            break
    # no spaces around operators: digits are single tokens, so the operands of each step sit right next to
    # its "=" (a two-layer model learns "7-4=" far more easily than "7 - 4 = ")
    prompt = f"Compute {a}{op1}{b}{op2}{c}."
    solution = f"{a}{op1}{b}={first}. {first}{op2}{c}={final}. The answer is \\boxed{{{final}}}."
    return {"id": f"math-{a}{op1}{b}{op2}{c}", "prompt": prompt, "answer": str(final), "solution": solution}


# ---- code ----------------------------------------------------------------------------------------------

OPS = {"plus": "+", "minus": "-", "times": "*"}
FUNCTION_NAMES = ("f", "g", "h")


def code_task(rng: random.Random) -> dict:
    name = rng.choice(FUNCTION_NAMES)
    w1, w2 = rng.choice(list(OPS)), rng.choice(list(OPS))
    k1, k2 = rng.randint(2, 9), rng.randint(1, 9)
    prompt = f"Write a Python function {name}(x) that returns x {w1} {k1} {w2} {k2}."
    expr = f"x {OPS[w1]} {k1} {OPS[w2]} {k2}"
    solution = f"```python\ndef {name}(x):\n    return {expr}\n```"
    inputs = [[0], [1], [5], [-3]]
    outputs = [eval(expr, {}, {"x": x[0]}) for x in inputs]  # noqa: S307 -- our own arithmetic template
    tests = {"fn_name": name, "inputs": inputs, "outputs": outputs}
    return {"id": f"code-{name}{w1}{k1}{w2}{k2}", "prompt": prompt, "tests": tests, "solution": solution}


# ---- science (multiple choice) -------------------------------------------------------------------------
# Knowledge recall, as in GPQA: the question names an item, the options are the four categories, and the
# answer is a lookup (item -> category -> letter) the model must have learnt from its training data. The
# options are always listed in this one canonical order (metal = A ... bird = D), and Eval's shuffleChoices
# stays off: two-layer models never learnt to find the matching option among shuffled ones (seven trace
# formats tried, teacher included, all at chance -- README). The letter is still 25% by guessing, balanced
# (every category has as many items), and the held-out questions differ from every training question by
# their framing, while their items are all in the training data: items never seen are unknowable, and a
# model asked about them collapses to one letter (measured). The backbone's "general" data shows it each of
# the 96 items only about twice, so it knows part of them and the science branch must add the rest.

SCIENCE_OPTIONS = ("metal", "gas", "mammal", "bird")
ITEMS = {
    "metal": ["iron", "copper", "gold", "silver", "zinc", "tin", "lead", "nickel", "cobalt", "chromium",
              "titanium", "platinum", "aluminum", "magnesium", "sodium", "potassium", "calcium", "lithium",
              "tungsten", "mercury", "uranium", "bismuth", "cadmium", "iridium"],
    "gas": ["oxygen", "helium", "neon", "argon", "hydrogen", "nitrogen", "methane", "ozone", "krypton", "xenon",
            "radon", "chlorine", "fluorine", "ammonia", "propane", "butane", "ethane", "ethylene", "acetylene",
            "steam", "propylene", "phosphine", "vapor", "silane"],
    "mammal": ["whale", "horse", "mouse", "tiger", "otter", "camel", "bat", "goat", "lion", "bear", "wolf", "fox",
               "deer", "rabbit", "zebra", "giraffe", "elephant", "monkey", "dolphin", "seal", "sheep", "beaver",
               "badger", "moose"],
    "bird": ["eagle", "robin", "owl", "crow", "swan", "parrot", "duck", "hawk", "sparrow", "pigeon", "falcon",
             "heron", "stork", "goose", "penguin", "ostrich", "flamingo", "pelican", "raven", "finch", "wren",
             "gull", "vulture", "peacock"],
}
# the framing around the item: what makes a held-out question new although its item is known
FRAMINGS = ("in the book", "in the story", "in the picture", "in the quiz", "on the list", "in the song",
            "in the game", "in the text", "in the film", "in the poem", "on the card", "in the note",
            "on the map", "in the box", "in the room", "on the shelf")
LETTERS = "ABCD"


def science_task(rng: random.Random, position: int | None = None) -> dict:
    position = rng.randrange(4) if position is None else position
    category = SCIENCE_OPTIONS[position]
    item = rng.choice(ITEMS[category])
    framing = rng.choice(FRAMINGS)
    letter = LETTERS[position]
    prompt = f"What is the {item} {framing}?"
    # "The copper": the item keeps its leading space, so it is the same token(s) as in the question
    solution = f"The {item} is a {category}. Answer: {letter}"
    return {"id": f"science-{item}-{framing.replace(' ', '-')}", "prompt": prompt, "choices": list(SCIENCE_OPTIONS),
            "answer": letter, "solution": solution}


MAKERS = {"math": math_task, "code": code_task, "science": science_task}
MCQ_TEMPLATE = "{{prompt}}\n{{choices}}"
MATH_TEMPLATE = "{{prompt}}\nPlease reason step by step, and put your final answer within \\boxed{}."


def user_message(domain: str, task: dict) -> str:
    """The user turn exactly as the TeacherGen/Eval templates render it (for the teacher's own training)."""
    if domain == "math":
        return MATH_TEMPLATE.replace("{{prompt}}", task["prompt"])
    if domain == "science":
        return task["prompt"] + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(task["choices"]))
    return task["prompt"]


def tasks(domain: str, count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``count`` distinct tasks (by id), none of whose ids is in ``exclude``."""
    rng = random.Random(f"{domain}-{seed}")
    out: dict[str, dict] = {}
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > count * 200:
            raise ValueError(f"{domain}: cannot draw {count} distinct tasks")
        # science: the answers go round the four letters, so every set is balanced over A-D
        task = science_task(rng, len(out) % 4) if domain == "science" else MAKERS[domain](rng)
        if task["id"] not in exclude and task["id"] not in out:
            out[task["id"]] = task
    return list(out.values())


def corpus(seed: int = 0, per_domain: int = 400) -> list[str]:
    """Text for the tokenizer: every domain's prompts and solutions, plus the chat scaffolding."""
    lines = ["You are a helpful assistant.", "Please reason step by step, and put your final answer within \\boxed{}."]
    for domain in DOMAINS:
        for task in tasks(domain, per_domain, seed + 1000):
            lines += [user_message(domain, task), task["solution"]]
    return lines
