"""Benchmark the decontamination gate (trainer/decontamination.py) against a plain Python n-gram check.

    .venv/bin/python bench/decontam.py [--questions 2000] [--records 100000] [--words 60] [--trace-words 0]
                                       [--ngram 8] [--repeats 3] [--smoke]

Synthetic text with English-like statistics: words drawn from a Zipf distribution over a 20,000-word
vocabulary, so common words and phrases repeat as in real prompts. The benchmark has ``--questions``
questions of 30-90 words (AIME/MATH length); the training set ``--records`` prompts of about ``--words``
words, of which 1% each are (a) an exact copy of a question re-cased and re-punctuated, (b) a question with one
word changed near its end (a near-duplicate), (c) a clean prompt with 10 consecutive words of a question inside
(an n-gram hit). With ``--trace-words`` every record also gets a response of that many words (checked as a
second text per record, as TeacherGen checks traces).

Timed (median of ``--repeats``): ``index`` (building the gate from the questions), ``gate`` (check every record:
exact, near-duplicate and n-gram), and ``baseline``: Open-R1's approach in plain Python (lowercase, collapse
whitespace here also with the gate's punctuation rule, a set of n-gram strings of the questions, each record
checked n-gram by n-gram), n-gram only. Both must flag every injected record; the numbers of flagged clean
records (chance overlaps) are printed. ``--smoke``: 50 questions, 2,000 records, 1 repeat (seconds).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from branchmerge.trainer.decontamination import Gate, normalize  # noqa: E402

VOCAB = 20_000
PUNCT = [",", ".", "?", ";", ":"]


def make_text(rng: random.Random, words: list[str], weights: list[float], n: int) -> str:
    out = rng.choices(words, cum_weights=weights, k=n)
    for i in range(7, len(out), rng.randint(7, 15)):  # some punctuation, as in real text
        out[i] += rng.choice(PUNCT)
    return " ".join(out)


def make_data(questions: int, records: int, words_per: int, trace_words: int, seed: int = 0):
    rng = random.Random(seed)
    words = [f"{chr(97 + i % 26)}{chr(97 + (i // 26) % 26)}{i}" for i in range(VOCAB)]
    cum, total = [], 0.0
    for rank in range(1, VOCAB + 1):  # Zipf, s = 1
        total += 1.0 / rank
        cum.append(total)
    bench = [make_text(rng, words, cum, rng.randint(30, 90)) for _ in range(questions)]
    prompts, kinds = [], []
    for i in range(records):
        kind = ("exact", "near-duplicate", "ngram", None)[min(3, i % 100)] if i % 100 < 3 else None
        if kind == "exact":
            text = rng.choice(bench).upper().replace(",", " ,")
        elif kind == "near-duplicate":
            q = rng.choice(bench).split()
            q[-2] = rng.choice(words)  # one word near the end
            text = " ".join(q)
        elif kind == "ngram":
            q = rng.choice(bench).split()
            start = rng.randrange(len(q) - 10)
            text = " ".join(make_text(rng, words, cum, words_per // 2).split() + q[start:start + 10]
                            + make_text(rng, words, cum, words_per // 2).split())
        else:
            text = make_text(rng, words, cum, rng.randint(words_per // 2, words_per * 3 // 2))
        prompts.append(text)
        kinds.append(kind)
    traces = [make_text(rng, words, cum, trace_words) for _ in range(records)] if trace_words else None
    return bench, prompts, traces, kinds


def baseline(bench: list[str], texts: list[str], n: int) -> list[bool]:
    """Open-R1's check: the set of the questions' n-gram strings, every n-gram of each text looked up."""
    grams = set()
    for q in bench:
        w = normalize(q).split()
        grams.update(" ".join(w[i:i + n]) for i in range(len(w) - n + 1))
    out = []
    for t in texts:
        w = normalize(t).split()
        out.append(any(" ".join(w[i:i + n]) in grams for i in range(len(w) - n + 1)))
    return out


def median_time(fn, repeats: int):
    """(median wall s, median CPU s of this process, result): CPU time is the steadier figure on a shared machine."""
    times, cpu, result = [], [], None
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(times), statistics.median(cpu), result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=2000)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--words", type=int, default=60)
    p.add_argument("--trace-words", type=int, default=0)
    p.add_argument("--ngram", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.questions, args.records, args.repeats = 50, 2000, 1
    normalize("warm up")  # the punctuation table is built once per process (~0.5 s), not per gate
    bench, prompts, traces, kinds = make_data(args.questions, args.records, args.words, args.trace_words)
    n_words = sum(len(t.split()) for t in prompts) + (sum(len(t.split()) for t in traces) if traces else 0)
    print(f"decontamination bench: {args.questions} questions vs {args.records} records ({n_words:,} words), "
          f"n={args.ngram}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    t_index, c_index, gate = median_time(lambda: Gate(bench, ngram=args.ngram), args.repeats)
    records = [[p, t] for p, t in zip(prompts, traces)] if traces else [[p] for p in prompts]
    t_gate, c_gate, reasons = median_time(lambda: gate.check_records(records), args.repeats)
    texts = [" ".join(r) for r in records]  # n-grams across the join are possible but absent in clean text
    t_base, c_base, flagged = median_time(lambda: baseline(bench, texts, args.ngram), args.repeats)
    injected = [i for i, k in enumerate(kinds) if k]
    missed = [i for i in injected if reasons[i] is None]
    by_kind = {k: sum(1 for i in injected if kinds[i] == k and reasons[i] == k) for k in ("exact", "near-duplicate",
                                                                                       "ngram")}
    clean_flags = sum(1 for i, k in enumerate(kinds) if k is None and reasons[i])
    base_missed = [i for i in injected if not flagged[i]]
    base_clean = sum(1 for i, k in enumerate(kinds) if k is None and flagged[i])
    print(f"  load average {os.getloadavg()[0]:.1f}; median of {args.repeats}: wall s, CPU s")
    print(f"  index   {t_index:8.3f} {c_index:8.3f}")
    print(f"  gate    {t_gate:8.3f} {c_gate:8.3f}  ({args.records / c_gate:,.0f} records per CPU s; exact, "
          f"near-duplicate, n-gram)")
    print(f"  baseline{t_base:8.3f} {c_base:8.3f}  (plain Python n-gram set, n-gram only)")
    print(f"  ratio gate / baseline: wall {t_gate / t_base:.3f}, CPU {c_gate / c_base:.3f}")
    print(f"  injected {len(injected)}: gate charged {by_kind} and missed {len(missed)}; baseline missed "
          f"{len(base_missed)}; clean records flagged: gate {clean_flags}, baseline {base_clean}")
    assert not missed and not base_missed, "an injected record was missed"


if __name__ == "__main__":
    main()
