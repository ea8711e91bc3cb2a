"""Result files of an Eval (``results.json``, ``results.md``) and the side-by-side comparison of several.

``results.json`` is the machine-readable summary (also what ``branchmerge compare`` reads); scores are
fractions, tables print percentages like the TinyR1 paper.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def tokens_text(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pass_k_text(summary: dict) -> str:
    pass_k = summary.get("passAtK", {})
    if not pass_k:
        return ""
    top = max(pass_k, key=int)
    return f"{pct(pass_k[top])} (k={top})"


def results_markdown(results: dict) -> str:
    """The human-readable report of one Eval."""
    sampling = results.get("sampling", {})
    lines = [
        f"# Eval results: {results.get('name', '')}".rstrip(),
        "",
        f"Model: `{results.get('model', '')}`  ",
        "Sampling: " + ", ".join(f"{k}={sampling[k]}" for k in ("temperature", "topP", "maxTokens", "seed")
                                 if k in sampling) + "  ",
        f"Score (mean pass@1 over benchmarks): **{pct(results['score'])}%**",
        "",
    ]
    rows = []
    for name, b in results["benchmarks"].items():
        rows.append([name, b.get("kind", ""), str(b["n"]), str(b["samples"]),
                     f"{pct(b['pass1'])} ± {pct(b['stderr'])}", _pass_k_text(b),
                     tokens_text(b["meanTokens"]), tokens_text(b["p95Tokens"]), pct(b["truncated"])])
    lines.append(_table(["benchmark", "kind", "questions", "k", "pass@1 (%)", "pass@k (%)", "mean tokens",
                         "p95 tokens", "truncated (%)"], rows, ["l", "l", "r", "r", "r", "r", "r", "r", "r"]))
    lines += ["", "pass@1 is averaged over k samples per question; ± is the standard error over questions; "
              "pass@k uses the unbiased estimator (Chen et al. 2021)."]
    reasons = {name: b["reasons"] for name, b in results["benchmarks"].items() if b.get("reasons")}
    if reasons:
        lines += ["", "Verdicts: " + "; ".join(
            f"{name}: " + ", ".join(f"{reason} {count}" for reason, count in counts.items())
            for name, counts in reasons.items())]
    if results.get("timing"):
        t = results["timing"]
        lines += ["", "Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items())]
    return "\n".join(lines) + "\n"


# ---- comparison ------------------------------------------------------------------------------------


class ResultsError(ValueError):
    """A results file is missing or malformed."""


def load_results(path: str | Path) -> dict:
    """A ``results.json`` (or a folder holding one, e.g. an Eval output or a stage result pointing at one)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file") from None
    except ValueError as err:
        raise ResultsError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        raise ResultsError(f"{path}: not an Eval results.json (no 'benchmarks' object)")
    for name, b in data["benchmarks"].items():
        missing = [k for k in ("pass1", "stderr", "meanTokens") if k not in b]
        if missing:
            raise ResultsError(f"{path}: benchmarks.{name}: missing {', '.join(missing)}")
    data.setdefault("name", path.parent.name)
    return data


def comparison(results: Sequence[dict], labels: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per model, per benchmark its pass@1 ± stderr and mean output tokens."""
    benchmarks: list[str] = []
    for r in results:
        benchmarks += [name for name in r["benchmarks"] if name not in benchmarks]
    header = ["model"] + [f"{name} pass@1" for name in benchmarks] + [f"{name} tokens" for name in benchmarks]
    header.append("score")
    rows = []
    for i, r in enumerate(results):
        label = labels[i] if labels and i < len(labels) else r.get("name") or f"results {i + 1}"
        scores, lengths = [], []
        for name in benchmarks:
            b = r["benchmarks"].get(name)
            scores.append(f"{pct(b['pass1'])} ± {pct(b['stderr'])}" if b else "-")
            lengths.append(tokens_text(b["meanTokens"]) if b else "-")
        shared = [r["benchmarks"][n]["pass1"] for n in benchmarks if n in r["benchmarks"]]
        rows.append([label] + scores + lengths + [pct(sum(shared) / len(shared)) if shared else "-"])
    return header, rows


def comparison_markdown(results: Sequence[dict], labels: Sequence[str] | None = None) -> str:
    header, rows = comparison(results, labels)
    return _table(header, rows) + "\n"
