"""The decontamination gate: normalisation, the three reasons against a brute-force reference, and the
TeacherGen and BranchSFT stages dropping contaminated records with their counts in manifest and metrics."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from branchmerge.api.validation import parse_resource
from branchmerge.trainer import decontamination as dc
from branchmerge.trainer.decontamination import Gate, normalize
from branchmerge.trainer.errors import InvalidInput


# AIME 2024 I-1 and II-1 (as the public release words them), a GPQA-style one and a short one
AYA = ("Every morning Aya goes for a 9-kilometer-long walk and stops at a coffee shop afterwards. When she walks "
       "at a constant speed of s kilometers per hour, the walk takes her 4 hours, including t minutes spent in "
       "the coffee shop.")
BOXES = ("Among the 900 residents of Aimeville, there are 195 who own a diamond ring, 367 who own a set of golf "
         "clubs, and 562 who own a garden spade.")
GAS = "Which of the following gases is the most abundant in the atmosphere of Mars?"
SHORT = "Compute 3+4-2."
QUESTIONS = [AYA, BOXES, GAS, SHORT]


# ---- normalisation and the three reasons, on strings worked out by hand ---------------------------------

def test_normalisation_nfkc_case_punctuation_whitespace():
    assert normalize("Ｃompute  3+4-2.\n\tWhat's  f(x)—ok?") == "compute 3+4 2 what s f x ok"
    assert normalize("ﬁne Ⅻ") == "fine xii"  # NFKC: the ligature and the numeral decompose
    # symbols stay (3+4-2 and 3-4+2 are different questions), punctuation becomes a separator
    assert normalize("3+4-2") != normalize("3-4+2")
    assert normalize("«Hello», world…") == "hello world"


def test_ngram_hits_by_hand():
    g = Gate([AYA], ngram=8)
    # "walk and stops at a coffee shop afterwards" is 8 words of the question: a hit
    assert g.check(["Then I walk and stops at a coffee shop afterwards, happily."]) == ["ngram"]
    # 7 of them ("and stops at a coffee shop afterwards") are not
    assert g.check(["Then I run and stops at a coffee shop afterwards, happily."]) == [None]
    # punctuation and case do not hide it: "9-kilometer-long" is "9 kilometer long"
    assert g.check(["AYA GOES FOR A 9 KILOMETER LONG WALK AND... whatever"]) == ["ngram"]
    assert Gate([AYA], ngram=12).check(["Then I walk and stops at a coffee shop afterwards"]) == [None]


def test_short_questions_count_whole_and_exact_wins():
    g = Gate([SHORT, "Hi there", GAS], ngram=8)
    assert g.check(["compute 3+4-2", "Please compute 3+4-2 now.", "compute 3-4+2", "hi there you",
                    "hi there"]) == ["exact", "ngram", None, None, "exact"]  # under 3 words: exact only
    # the 14-word GAS question: an 8-gram of it inside a longer text
    assert g.check(["Tell me which of the following gases is the most abundant on Venus"]) == ["ngram"]


def _shingles(text: str) -> set:
    w = normalize(text).split()
    return {tuple(w[i:i + 5]) for i in range(len(w) - 4)}


def test_near_duplicate_is_jaccard_of_word_5gram_shingles():
    edited = AYA.replace("in the coffee", "in a coffee")  # the 3rd word from the end: 3 shingles differ
    a, b = _shingles(AYA), _shingles(edited)
    jaccard = len(a & b) / len(a | b)
    assert 0.8 < jaccard < 0.9, jaccard  # 43 words, 39 shingles: 36 shared of 42
    assert Gate([AYA], near=0.8).check([edited]) == ["near-duplicate"]
    assert Gate([AYA], near=jaccard).check([edited]) == ["near-duplicate"]
    # just above its similarity it is no near-duplicate, but it still shares 8-grams with the question
    assert Gate([AYA], near=jaccard + 1e-6).check([edited]) == ["ngram"]
    assert Gate([AYA], near=jaccard + 1e-6, ngram=41).check([edited]) == [None]  # 40 words in common


def _reference(questions: list[str], texts: list[str], n: int, near: float) -> list:
    """Brute force over every (text, question) pair with Python sets and lists."""
    qw = [normalize(q).split() for q in questions]
    out = []
    for text in texts:
        w = normalize(text).split()
        if w and any(w == q for q in qw):
            out.append("exact")
            continue
        s = {tuple(w[i:i + 5]) for i in range(len(w) - 4)}
        if s and any((t := {tuple(q[i:i + 5]) for i in range(len(q) - 4)})
                     and len(s & t) / len(s | t) >= near for q in qw):
            out.append("near-duplicate")
            continue
        grams = {tuple(w[i:i + k]) for k in range(3, n + 1) for i in range(len(w) - k + 1)}
        hit = any(tuple(q[i:i + n]) in grams for q in qw if len(q) >= n for i in range(len(q) - n + 1)) or \
            any(tuple(q) in grams for q in qw if 3 <= len(q) < n)
        out.append("ngram" if hit else None)
    return out


@pytest.mark.parametrize("n,near", [(8, 0.8), (5, 0.5), (13, 0.95)])
def test_agrees_with_brute_force_on_random_texts(monkeypatch, n, near):
    rng = random.Random(n)
    vocab = [f"w{i}" for i in range(40)] + ["x^2", "3+4", "α", "Straße"]
    questions = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 24))) for _ in range(60)]
    texts = []
    for _ in range(600):
        q = rng.choice(questions).split()
        kind = rng.randrange(6)
        if kind == 0:  # a copy, punctuated and cased differently
            texts.append(", ".join(q).upper() + "?")
        elif kind == 1:  # a word changed
            q[rng.randrange(len(q))] = rng.choice(vocab)
            texts.append(" ".join(q))
        elif kind == 2:  # a fragment inside other text
            a = rng.randrange(len(q))
            texts.append(" ".join(["zz"] * rng.randint(0, 5) + q[a:a + rng.randint(1, 12)] + ["yy"]))
        elif kind == 3:  # random words of the same vocabulary
            texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 40))))
        elif kind == 4:  # words the benchmark never uses
            texts.append(" ".join(f"u{rng.randrange(9)}" for _ in range(rng.randint(1, 20))))
        else:  # a word appended: a near-duplicate of a long question
            texts.append(" ".join(q + [rng.choice(vocab)]))
    monkeypatch.setattr(dc, "BATCH_WORDS", 500)  # several batches
    got = Gate(questions, ngram=n, near=near).check(texts)
    want = _reference(questions, texts, n, near)
    assert got == want
    assert {r for r in want} >= {"exact", "near-duplicate", "ngram", None}  # every reason was exercised


def test_records_take_their_first_reason_and_counts_list_every_reason():
    g = Gate(QUESTIONS)
    assert g.check_records([["clean", "Note that every morning Aya goes for a 9-kilometer-long walk, they say."], [AYA.upper(), "clean"], ["clean"], []]) == \
        ["ngram", "exact", None, None]
    assert dc.counts(["exact", None, "ngram", "ngram"]) == {"exact": 1, "near-duplicate": 0, "ngram": 2}


def test_benchmark_questions_from_files(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": 1, "prompt": AYA, "answer": "204"}) + "\n"
                                      + json.dumps({"id": 2, "problem": BOXES}) + "\n")
    assert dc.load_questions(tmp_path / "b.jsonl", ["prompt", "problem"], "x") == [AYA, BOXES]
    with pytest.raises(InvalidInput, match=r"b.jsonl:2: no question text .*questionFields"):
        dc.load_questions(tmp_path / "b.jsonl", ["prompt"], "spec.decontaminate.benchmarks[0]")


def test_the_spec_field_is_walked_by_the_reference_graph_and_hf_staging():
    from branchmerge.api.graph import references
    from branchmerge.api.uris import hf_inputs

    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "BranchSFT", "metadata": {"name": "b"},
           "spec": {"base": {"uri": "file:///m"}, "data": [{"uri": "file:///d.jsonl"}],
                    "decontaminate": {"benchmarks": [{"from": {"kind": "TeacherGen", "name": "held-out"}},
                                                     {"uri": "hf://datasets/org/aime@main/aime.jsonl"}]}}}
    refs = references(parse_resource(doc))
    assert [(r.path, r.key) for r in refs] == [("spec.decontaminate.benchmarks[0].from", "TeacherGen/held-out")]
    assert hf_inputs(doc["spec"]) == [("hf://datasets/org/aime@main/aime.jsonl", ())]


# ---- the stages ------------------------------------------------------------------------------------------

def _bench(tmp: Path) -> Path:
    path = tmp / "aime.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": q, "answer": "1"}) + "\n" for i, q in enumerate(QUESTIONS)))
    return path


CLEAN = ["A train leaves the station at noon and travels east at sixty miles per hour for three hours.",
         "How many positive divisors does the number three hundred and sixty have in total?",
         "Find the remainder when two to the power of one hundred is divided by seven, step by step."]


def test_teachergen_drops_prompts_before_and_traces_after_generation(tmp_path, server, monkeypatch):
    from branchmerge.trainer.progress import Progress
    from branchmerge.trainer.stage import StageContext
    from branchmerge.trainer.teachergen import stage as teachergen

    monkeypatch.setenv("BRANCHMERGE_COMMIT_SECONDS", "0")
    bench = _bench(tmp_path)
    prompts = [{"id": "p-exact", "problem": AYA.lower().replace(",", "")},
               {"id": "p-near", "problem": AYA.replace("in the coffee", "in a coffee")},
               {"id": "p-ngram", "problem": "Sam asks: among the 900 residents of Aimeville, there are 195 who own what?"}]
    prompts += [{"id": f"p-clean-{i}", "problem": q} for i, q in enumerate(CLEAN)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    # the teacher restates a benchmark question in its answer to the second clean prompt
    server.answer = lambda body: (f"Recall: {GAS} So the answer is 4." if CLEAN[1] in body["messages"][-1]["content"]
                                  else "The answer is 4.")
    out = tmp_path / "out"
    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "TeacherGen", "metadata": {"name": "t"},
           "spec": {"teacher": {"engine": {"name": "openai", "endpoint": {"baseUrl": server.url, "model": "t"}}},
                    "prompts": {"dataset": {"uri": (tmp_path / "prompts.jsonl").as_uri()}, "idField": "id"},
                    "template": "{{problem}}\nPlease reason step by step.",
                    "sampling": {"samplesPerPrompt": 1, "maxTokens": 64}, "verify": {"kind": "none"},
                    "decontaminate": {"benchmarks": [{"uri": bench.as_uri()}]},
                    "output": {"uri": out.as_uri()}}}

    def ctx():
        return StageContext(parse_resource(doc), out.as_uri(), out, Progress(enabled=False))

    metrics = teachergen.run(ctx())
    asked = [b["messages"][-1]["content"] for b in server.requests]
    assert sorted(a.split("\n")[0] for a in asked) == sorted(CLEAN)  # contaminated prompts were never generated
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [r["promptId"] for r in rows] == ["p-clean-0", "p-clean-2"]
    manifest = json.loads((out / "teachergen.json").read_text())
    gate = manifest["decontamination"]
    assert gate["prompts"] == {"exact": 1, "near-duplicate": 1, "ngram": 1}
    assert gate["samples"] == {"exact": 0, "near-duplicate": 0, "ngram": 1}
    assert gate["dropped"] == metrics["decontamination"] == {"exact": 1, "near-duplicate": 1, "ngram": 2}
    assert gate["benchmarks"] == [bench.as_uri()] and gate["ngram"] == 8
    assert manifest["counts"]["prompts"] == 3 and manifest["counts"]["samplesPublished"] == 2
    assert metrics["promptsTotal"] == 3
    # a rerun finds the dataset published and reports the same counts
    before = (out / "data.jsonl").read_bytes()
    assert teachergen.run(ctx())["decontamination"] == metrics["decontamination"]
    assert (out / "data.jsonl").read_bytes() == before
    # a gate on other benchmark content re-filters the committed samples without generating again
    bench.write_text(json.dumps({"id": 0, "prompt": BOXES}) + "\n")
    requests = len(server.requests)
    again = teachergen.run(ctx())
    assert again["decontamination"] == {"exact": 0, "near-duplicate": 0, "ngram": 1}
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [r["promptId"] for r in rows] == ["p-clean-0", "p-clean-1", "p-clean-2", "p-exact", "p-near"]
    assert len(server.requests) - requests == 5  # another prompt set: the work starts over


def test_teachergen_with_every_prompt_contaminated_is_invalid(tmp_path, server):
    from branchmerge.trainer.progress import Progress
    from branchmerge.trainer.stage import StageContext
    from branchmerge.trainer.teachergen import stage as teachergen

    bench = _bench(tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps({"problem": GAS}) + "\n")
    out = tmp_path / "out"
    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "TeacherGen", "metadata": {"name": "t"},
           "spec": {"teacher": {"engine": {"name": "openai", "endpoint": {"baseUrl": server.url, "model": "t"}}},
                    "prompts": {"dataset": {"uri": (tmp_path / "p.jsonl").as_uri()}}, "template": "{{problem}}",
                    "decontaminate": {"benchmarks": [{"uri": bench.as_uri()}]}, "output": {"uri": out.as_uri()}}}
    with pytest.raises(InvalidInput, match="all 1 prompts match"):
        teachergen.run(StageContext(parse_resource(doc), out.as_uri(), out, Progress(enabled=False)))


def _sft_spec(tmp: Path, bench: Path, **gate):
    from branchmerge.api.sft import BranchSFTSpec

    return BranchSFTSpec.model_validate({
        "base": {"uri": "file:///m"}, "data": [{"uri": (tmp / "chat.jsonl").as_uri()},
                                              {"uri": (tmp / "pairs.jsonl").as_uri()}],
        "decontaminate": {"benchmarks": [{"uri": bench.as_uri()}], **gate}, "training": {"maxSeqLen": 512}})


def _resolve(ref, what):
    from branchmerge.api.uris import local_path

    return local_path(ref.uri)


def test_sft_drops_records_whose_user_turns_match(tmp_path, tiny_tokenizer):
    from branchmerge.trainer.sft.dataset import build_samples

    bench = _bench(tmp_path)
    chat = [{"messages": [{"role": "system", "content": GAS},  # a system turn is not checked
                          {"role": "user", "content": q}, {"role": "assistant", "content": "4"}]}
            for q in CLEAN + [BOXES.upper()]]
    pairs = [{"prompt": f"An old contest problem I want to discuss with you today: {AYA} Please answer it briefly "
                        "and explain every step of the way.", "response": "ok"},  # the question inside more text
             {"prompt": "What is the capital of France?", "response": f"{GAS}"},  # a response is not checked
             {"prompt": SHORT.replace("-", " - "), "response": "5"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    samples, stats = build_samples(_sft_spec(tmp_path, bench), tiny_tokenizer, _resolve)
    assert stats.records == 7 and len(samples) == 4 and stats.per_dataset == [3, 1]
    assert stats.decontaminated == {"exact": 2, "near-duplicate": 0, "ngram": 1}
    # without a gate nothing is dropped and nothing is counted
    from branchmerge.api.sft import BranchSFTSpec

    plain = BranchSFTSpec.model_validate({"base": {"uri": "file:///m"}, "data": [
        {"uri": (tmp_path / "chat.jsonl").as_uri()}], "training": {"maxSeqLen": 512}})
    samples, stats = build_samples(plain, tiny_tokenizer, _resolve)
    assert len(samples) == 4 and stats.decontaminated == {}


def test_sft_token_cache_key_follows_the_gate_and_its_benchmark(tmp_path, tiny_model):
    from branchmerge.trainer.sft import token_cache

    bench = _bench(tmp_path)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "c", "response": "d"}) + "\n")
    key = token_cache.cache_key(_sft_spec(tmp_path, bench), None, tiny_model, _resolve)
    assert key == token_cache.cache_key(_sft_spec(tmp_path, bench), None, tiny_model, _resolve)
    assert key != token_cache.cache_key(_sft_spec(tmp_path, bench, ngram=13), None, tiny_model, _resolve)
    bench.write_text(json.dumps({"prompt": GAS}) + "\n")
    assert key != token_cache.cache_key(_sft_spec(tmp_path, bench), None, tiny_model, _resolve)


def test_the_quickstart_gate_passes_its_training_data_and_catches_a_leaked_question(tmp_path):
    """The quickstart declares the gate on its TeacherGens and outside-data SFTs: its own data (prompts drawn
    apart from the held-out splits) passes whole, and a held-out question copied into the prompts is caught."""
    from branchmerge.quickstart.manifests import pipeline
    from branchmerge.quickstart.prepare import prepare
    from branchmerge.trainer.teachergen.prompts import render

    root = prepare(tmp_path / "inputs", "reduced")
    docs = {d["metadata"]["name"]: parse_resource(d) for d in pipeline(root, "reduced")}
    for domain in ("math", "code", "science"):
        spec = docs[f"qs-traces-{domain}"].spec
        gate = dc.gate_of(spec.decontaminate, _resolve)
        prompts = [json.loads(line) for line in (root / "data" / f"qs-{domain}-prompts.jsonl").read_text().splitlines()]
        leaked = [json.loads(line) for line in (root / "data" / f"qs-{domain}-eval.jsonl").read_text().splitlines()]
        texts = [[render(spec.template, r), r["question"]] for r in prompts + leaked[:3]]
        reasons = gate.check_records(texts)
        assert reasons[:len(prompts)] == [None] * len(prompts), domain
        assert all(reasons[len(prompts):]), (domain, reasons[len(prompts):])
    teacher = docs["qs-teacher"].spec
    gate = dc.gate_of(teacher.decontaminate, _resolve)
    for ref in teacher.data:
        rows = [json.loads(line) for line in _resolve(ref, "").read_text().splitlines()]
        assert gate.check([r["prompt"] for r in rows]) == [None] * len(rows)


def test_both_control_planes_resolve_a_benchmark_from_an_upstream_teachergen():
    """The operator and the local runner share resolve(): a ``from:`` benchmark becomes its output URI."""
    from branchmerge.operator.resolve import blockers, resolve

    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "BranchSFT", "metadata": {"name": "b"},
           "spec": {"base": {"uri": "file:///m"}, "data": [{"uri": "file:///d.jsonl"}],
                    "decontaminate": {"benchmarks": [{"from": {"kind": "TeacherGen", "name": "held-out"}}],
                                      "ngram": 10}}}
    resource = parse_resource(doc)
    assert [b.reason for b in blockers(resource, {"TeacherGen/held-out": "Running"})] == ["UpstreamNotReady"]
    resolved = resolve(resource, {"TeacherGen/held-out": "file:///out/held-out"})
    assert resolved["spec"]["decontaminate"] == {"benchmarks": [{"uri": "file:///out/held-out"}], "ngram": 10}
