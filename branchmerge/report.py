"""``branchmerge report``: one self-contained HTML page about a finished (or partial) local run.

Sections: pipeline graph + timings, training loss per branch (from the stages' progress events), TeacherGen
acceptance by reason, Eval scores as grouped bars and a models x benchmarks table (the paper's "Table 2"
shape), what each merge keeps of each branch's gain over the base with its spread over eval seeds and one
verdict per merge, and merge statistics. Figures are matplotlib PNGs embedded as base64, so the file can be mailed around.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .api.graph import input_refs, ref_key
from .api.labels import LABEL_SEARCH
from .api.progress import read_events
from .api.timefmt import parse_time
from .api.uris import UnresolvableUri, local_path
from .operator.local.display import fmt_duration, reason_of
from .operator.local.status_files import StatusFiles
from .operator.local.summary import duration
from .operator.local.workdir import Workdir

PHASE_COLOR = {"Succeeded": "#2e7d32", "Failed": "#c62828", "Running": "#0277bd", "Waiting": "#f9a825",
               "Pending": "#9e9e9e", "Suspended": "#6a1b9a"}


# ---- data gathered from the workdir -----------------------------------------------------------------

@dataclass
class Stage:
    key: str
    record: dict
    result: dict
    events: list[dict]

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def name(self) -> str:
        return self.record["metadata"]["name"]

    @property
    def status(self) -> dict:
        return self.record.get("status", {})

    @property
    def spec(self) -> dict:
        return self.record.get("spec", {})

    @property
    def search(self) -> str | None:
        """The MergeSearch this stage is a trial (or reference Eval) of; None for the pipeline's own stages."""
        return ((self.record.get("metadata") or {}).get("labels") or {}).get(LABEL_SEARCH)

    def times(self) -> tuple[float, float] | None:
        if "startedAt" in self.result and "finishedAt" in self.result:
            return float(self.result["startedAt"]), float(self.result["finishedAt"])
        start, end = parse_time(self.status.get("startTime")), parse_time(self.status.get("completionTime"))
        return (start, end) if start is not None and end is not None else None


@dataclass
class RunData:
    workdir: Workdir
    stages: dict[str, Stage] = field(default_factory=dict)

    def of_kind(self, kind: str, trials: bool = False) -> list[Stage]:
        """The stages of ``kind``; a MergeSearch's children (scored on its dev split) only with ``trials``."""
        return [s for s in self.stages.values() if s.kind == kind and (trials or s.search is None)]


def gather(workdir: Workdir) -> RunData:
    data = RunData(workdir)
    for record in StatusFiles(workdir).all():
        key = f"{record['kind']}/{record['metadata']['name']}"
        try:
            result = json.loads(workdir.result_file(key).read_text())
        except (OSError, ValueError):
            result = {}
        events, _ = read_events(workdir.progress_file(key))
        data.stages[key] = Stage(key, record, result, events)
    return data


def upstream_keys(stage: Stage) -> list[str]:
    """Kind/name of the stage's upstreams, each once, in spec order."""
    return list(dict.fromkeys(ref.key for ref in input_refs(stage.spec) if ref.upstream))


# ---- figures --------------------------------------------------------------------------------------

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def layers(data: RunData) -> dict[str, int]:
    """Depth of each stage in the DAG (longest path from a root)."""
    depth: dict[str, int] = {}

    def visit(key: str, seen: frozenset = frozenset()) -> int:
        if key in depth:
            return depth[key]
        ups = [u for u in upstream_keys(data.stages[key]) if u in data.stages and u not in seen]
        depth[key] = 1 + max((visit(u, seen | {key}) for u in ups), default=-1)
        return depth[key]

    for key in data.stages:
        visit(key)
    return depth


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed, also on a desktop
    import matplotlib.pyplot as plt

    return plt


def pipeline_figure(data: RunData) -> str:
    plt = _pyplot()

    depth = layers(data)
    columns: dict[int, list[str]] = {}
    for key in sorted(data.stages, key=lambda k: (depth[k], k)):
        columns.setdefault(depth[key], []).append(key)
    height = max(len(v) for v in columns.values())
    pos = {key: (d * 3.0, (height - 1) / 2 - i) for d, keys in columns.items() for i, key in enumerate(keys)}
    fig, ax = plt.subplots(figsize=(max(6, 2.6 * len(columns)), max(2.5, 0.75 * height + 1)))
    for key, stage in data.stages.items():
        for up in upstream_keys(stage):
            if up in pos:
                (x0, y0), (x1, y1) = pos[up], pos[key]
                ax.annotate("", xy=(x1 - 1.1, y1), xytext=(x0 + 1.1, y0),
                            arrowprops=dict(arrowstyle="->", color="#555", lw=1))
    for key, (x, y) in pos.items():
        stage = data.stages[key]
        phase = stage.status.get("phase", "Pending")
        ax.text(x, y, f"{stage.name}\n{stage.kind} · {phase}", ha="center", va="center", fontsize=8, color="white",
                bbox=dict(boxstyle="round,pad=0.4", fc=PHASE_COLOR.get(phase, "#777"), ec="none", alpha=0.9))
    ax.set_xlim(-1.6, 3.0 * max(columns) + 1.6)
    ax.set_ylim(-(height + 1) / 2, (height + 1) / 2)
    ax.axis("off")
    return _png(fig)


def timeline_figure(data: RunData) -> str | None:
    plt = _pyplot()
    spans = {k: s.times() for k, s in data.stages.items() if s.times()}
    if not spans:
        return None
    t0 = min(a for a, _ in spans.values())
    keys = sorted(spans, key=lambda k: spans[k][0])
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(keys) + 1.2))
    for i, key in enumerate(keys):
        a, b = spans[key]
        phase = data.stages[key].status.get("phase", "Pending")
        ax.barh(i, b - a, left=a - t0, color=PHASE_COLOR.get(phase, "#777"))
        ax.text(b - t0, i, f" {fmt_duration(b - a)}", va="center", fontsize=7)
    ax.set_yticks(range(len(keys)), keys, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first stage started")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def loss_series(stage: Stage) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, event in enumerate(stage.events):
        metrics = event.get("metrics") or {}
        loss = metrics.get("loss")
        if isinstance(loss, (int, float)):
            step = metrics.get("step")
            xs.append(float(step) if isinstance(step, (int, float)) else float(i))
            ys.append(float(loss))
    return xs, ys


def loss_figure(data: RunData) -> str | None:
    plt = _pyplot()
    curves = {s.name + (f" ({s.spec.get('domain')})" if s.spec.get("domain") else ""): loss_series(s)
              for s in sorted(data.of_kind("BranchSFT"), key=lambda s: s.name)}
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, lw=1.4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def domain_weights_section(data: RunData) -> str | None:
    """DDK: each BranchSFT's domain sampling weights over the optimizer steps (metrics.domainWeightsHistory)."""
    stages = [s for s in sorted(data.of_kind("BranchSFT"), key=lambda s: s.name)
              if isinstance(((s.result.get("metrics") or {}).get("domainWeightsHistory")), list)
              and (s.result.get("metrics") or {}).get("domainWeightsHistory")]
    if not stages:
        return None
    plt = _pyplot()
    parts = ["<p>DDK: the sampling weight of each domain, updated from the student's and the teacher's "
             "cross-entropy on held-out samples of the domain (weight moves to where the student lags most).</p>"]
    for stage in stages:
        metrics = stage.result["metrics"]
        history = [h for h in metrics["domainWeightsHistory"] if isinstance(h, dict) and "weights" in h]
        domains = list(dict.fromkeys(d for h in history for d in h["weights"]))
        start = metrics.get("domainInitialWeights") or {}
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for d in domains:
            xs = ([-0.5] if d in start else []) + [float(h.get("step", i)) for i, h in enumerate(history)]
            ys = ([float(start[d])] if d in start else []) + [float(h["weights"].get(d, 0.0)) for h in history]
            ax.step(xs, ys, where="post", label=d, lw=1.4)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("sampling weight")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        last = history[-1]
        rows = [[d, _scalar(start.get(d, "-")), _scalar(last["weights"].get(d)),
                 _scalar((last.get("studentLoss") or {}).get(d, "-")),
                 _scalar((last.get("teacherLoss") or {}).get(d, "-"))] for d in domains]
        parts += [f"<h3>{html.escape(stage.name)}</h3>", _img(_png(fig), f"domain weights of {stage.name}"),
                  _table(["domain", "initial weight", f"weight (step {last.get('step', '?')})", "student CE",
                          "teacher CE"], rows)]
    return "\n".join(parts)


def acceptance(stage: Stage) -> dict[str, int]:
    """kept + rejected counts by reason from a TeacherGen's metrics."""
    metrics = stage.result.get("metrics") or stage.status.get("metrics") or {}
    counts: dict[str, int] = {}
    if isinstance(metrics.get("samplesKept"), (int, float)):
        counts["kept"] = int(metrics["samplesKept"])
    for name in ("samplesRejected", "rejectedByReason", "rejected", "rejections"):
        if isinstance(metrics.get(name), dict):
            counts.update({str(k): int(v) for k, v in metrics[name].items() if isinstance(v, (int, float))})
            break
    else:
        for name, value in metrics.items():
            if name.startswith("rejected") and name != "rejected" and isinstance(value, (int, float)):
                counts[name[len("rejected"):].lstrip("_").lower() or "rejected"] = int(value)
    return counts


def acceptance_figure(data: RunData) -> str | None:
    plt = _pyplot()
    rows = {s.name: acceptance(s) for s in sorted(data.of_kind("TeacherGen"), key=lambda s: s.name)}
    rows = {k: v for k, v in rows.items() if v}
    if not rows:
        return None
    reasons = ["kept"] + sorted({r for counts in rows.values() for r in counts} - {"kept"})
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.6))
    left = [0.0] * len(rows)
    rejected_colors = ["#ef6c00", "#c62828", "#6a1b9a", "#546e7a", "#8d6e63", "#f9a825", "#0277bd", "#ad1457"]
    for j, reason in enumerate(reasons):
        values = [rows[name].get(reason, 0) for name in rows]
        color = "#2e7d32" if reason == "kept" else rejected_colors[(j - 1) % len(rejected_colors)]
        ax.barh(list(rows), values, left=left, label=reason, color=color)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("samples")
    ax.legend(fontsize=8, ncol=min(4, len(reasons)), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return _png(fig)


# ---- eval table -----------------------------------------------------------------------------------

def _eval_folder(stage: Stage) -> Path | None:
    uri = (stage.status.get("output") or {}).get("uri")
    if stage.status.get("phase") != "Succeeded" or not uri:
        return None
    try:
        return local_path(uri)
    except UnresolvableUri:
        return None


def eval_results(stage: Stage) -> dict | None:
    folder = _eval_folder(stage)
    try:
        return json.loads((folder / "results.json").read_text()) if folder else None
    except (OSError, ValueError):
        return None


def seed_scores(stage: Stage, benchmark: str) -> list[float]:
    """pass@1 per sample index from the Eval's per-question records (empty if they cannot be read)."""
    folder = _eval_folder(stage)
    try:
        lines = (folder / "records" / f"{benchmark}.jsonl").read_text().splitlines() if folder else []
        verdicts = [[bool(s["correct"]) for s in json.loads(line)["samples"]] for line in lines if line.strip()]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    k = min((len(v) for v in verdicts), default=0)
    return [sum(v[j] for v in verdicts) / len(verdicts) for j in range(k)]


@dataclass
class Row:
    label: str
    role: str  # base | branch | merge | model
    domain: str | None
    scores: dict[str, tuple[float, float, float | None]]  # benchmark -> (pass1, stderr, mean tokens)
    seeds: dict[str, list[float]] = field(default_factory=dict)
    """benchmark -> pass@1 per eval seed: sample j of every question is one independent sampled run of the
    whole benchmark, so the k samples give k estimates of pass@1 (their mean is ``scores``)."""


def roles(data: RunData) -> tuple[dict[str, tuple[str, str | None]], set[str]]:
    """Model key -> (role, domain); bases = the `base` refs of the BranchSFTs that feed a Merge."""
    info: dict[str, tuple[str, str | None]] = {}
    merged_inputs: set[str] = set()
    for m in data.of_kind("Merge") + data.of_kind("MergeSearch"):  # a search's output is its winning merge
        info[m.key] = ("merge", None)
        merged_inputs |= {ref_key(r) for r in m.spec.get("models", [])} | {ref_key(m.spec.get("base"))}
    bases: set[str] = set()
    for b in data.of_kind("BranchSFT"):
        if b.key in merged_inputs:
            info[b.key] = ("branch", b.spec.get("domain"))
            bases.add(ref_key(b.spec.get("base")))
    for base in bases:
        if base:
            info[base] = ("base", None)
    return info, bases


def eval_rows(data: RunData) -> list[Row]:
    info, _ = roles(data)
    order = {"base": 0, "branch": 1, "model": 2, "merge": 3}
    rows = []
    for stage in data.of_kind("Eval"):
        results = eval_results(stage)
        if not results:
            continue
        model = ref_key(stage.spec.get("model"))
        role, domain = info.get(model, ("model", None))
        label = model.split("/", 1)[1] if model and "/" in model and not model.startswith("file:") else stage.name
        if role == "base":
            label = f"base ({stage.name})"
        scores = {name: (float(b["pass1"]), float(b.get("stderr", 0.0)),
                         float(b["meanTokens"]) if "meanTokens" in b else None)
                  for name, b in results.get("benchmarks", {}).items()}
        rows.append(Row(label, role, domain, scores, {name: seed_scores(stage, name) for name in scores}))
    return sorted(rows, key=lambda r: (order[r.role], r.label))


def benchmark_names(rows: list[Row]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names += [n for n in row.scores if n not in names]
    return names


def eval_figure(rows: list[Row]) -> str | None:
    plt = _pyplot()
    if not rows:
        return None
    benches = benchmark_names(rows)
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(benches) + 0.25 * len(rows)), 4))
    cmap = plt.get_cmap("tab10")
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(benches))]
        ys = [row.scores.get(b, (0, 0, None))[0] * 100 for b in benches]
        err = [row.scores.get(b, (0, 0, None))[1] * 100 for b in benches]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=f"{row.label}", color=cmap(i % 10),
               edgecolor="black" if row.role == "merge" else "none")
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    return _png(fig)


@dataclass
class Retention:
    """What one merge keeps of one branch's gain over the base on the branch's own benchmark."""

    merge: str
    domain: str
    base: float
    branch: float
    merged: float
    diffs: list[float]  # merged - base under each eval seed (sample index)
    gains: list[float]  # (merged - base) / (branch - base) under each seed where the branch gained

    @property
    def gain(self) -> float | None:
        """(merged - base) / (branch - base) on the mean scores; None when the branch did not beat the base."""
        return (self.merged - self.base) / (self.branch - self.base) if self.branch > self.base else None

    @property
    def above_base(self) -> bool:
        """Above the base beyond the seed spread: ahead of it under every eval seed (on the mean without seeds)."""
        return min(self.diffs) > 0 if self.diffs else self.merged > self.base


def _paired(a: list[float], b: list[float]) -> list[tuple[float, float]]:
    return list(zip(a, b)) if a and len(a) == len(b) else []


def retention(rows: list[Row]) -> list[Retention]:
    """Per evaluated merge and per branch with a benchmark named like its domain: the retained gain."""
    base = next((r for r in rows if r.role == "base"), None)
    if base is None:
        return []
    out = []
    for merged in (r for r in rows if r.role == "merge"):
        for branch in (r for r in rows if r.role == "branch" and r.domain):
            d = branch.domain
            if not all(d in r.scores for r in (base, branch, merged)):
                continue
            seeds = [(b, br, m) for (b, br), m in zip(_paired(base.seeds.get(d, []), branch.seeds.get(d, [])),
                                                       merged.seeds.get(d, []))]
            if len(seeds) != len(merged.seeds.get(d, [])):
                seeds = []  # eval seeds differ in number: no pairing
            out.append(Retention(merged.label, d, base.scores[d][0], branch.scores[d][0], merged.scores[d][0],
                                 [m - b for b, _, m in seeds], [(m - b) / (br - b) for b, br, m in seeds if br > b]))
    return out


def verdicts(found: list[Retention]) -> list[tuple[str, bool, str]]:
    """One verdict per merge: above the base on every domain beyond the spread over eval seeds."""
    merges: dict[str, list[Retention]] = {}
    for r in found:
        merges.setdefault(r.merge, []).append(r)
    out = []
    for merge, items in merges.items():
        seeds = min(len(r.diffs) for r in items)
        detail = "; ".join(f"{r.domain} {100 * (r.merged - r.base):+.1f} points"
                           + (f" [{100 * min(r.diffs):+.1f}, {100 * max(r.diffs):+.1f}]" if r.diffs else "")
                           for r in items)
        spread = f"under each eval seed (k={seeds})" if seeds else "(one score each, no seed spread)"
        out.append((f"{merge} above the base on every domain {spread}", all(r.above_base for r in items), detail))
    return out


def gain_text(r: Retention) -> str:
    if r.gain is None:
        return "n/a (branch not above base)"
    spread = f" [{min(r.gains):.2f}, {max(r.gains):.2f}]" if r.gains else ""
    return f"{r.gain:.2f}{spread}"


# ---- html -------------------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}td.num{text-align:right}td.best{font-weight:bold;background:#e8f5e9}
.ok{color:#2e7d32}.bad{color:#c62828}img{max-width:100%}h2{border-bottom:1px solid #ddd;margin-top:1.6em}"""


def _table(header: list[str], rows: list[list[str]], classes: list[list[str]] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            cls = classes[i][j] if classes else ""
            cells.append(f'<td class="{cls}">{html.escape(str(cell))}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _scalar(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def eval_table(rows: list[Row]) -> str:
    benches = benchmark_names(rows)
    best = {b: max((r.scores[b][0] for r in rows if b in r.scores), default=None) for b in benches}
    header = ["model", "role"] + [f"{b} pass@1 (%)" for b in benches] + ["mean", "mean tokens"]
    body, classes = [], []
    for r in rows:
        cells = [r.label, r.role + (f" ({r.domain})" if r.domain else "")]
        cls = ["", ""]
        for b in benches:
            if b in r.scores:
                cells.append(f"{r.scores[b][0] * 100:.1f} ± {r.scores[b][1] * 100:.1f}")
                cls.append("num best" if r.scores[b][0] == best[b] else "num")
            else:
                cells.append("-")
                cls.append("num")
        mean = sum(s[0] for s in r.scores.values()) / max(1, len(r.scores))
        tokens = [s[2] for s in r.scores.values() if s[2] is not None]
        cells += [f"{mean * 100:.1f}", f"{sum(tokens) / len(tokens):.0f}" if tokens else "-"]
        cls += ["num", "num"]
        body.append(cells)
        classes.append(cls)
    return _table(header, body, classes)


def stages_table(data: RunData) -> str:
    rows = []
    for key in sorted(data.stages, key=lambda k: (layers(data)[k], k)):
        s = data.stages[key]
        rows.append([key, s.status.get("phase", ""), reason_of(s.record), str(s.status.get("attempts", 0)),
                     fmt_duration(duration(s.status)), (s.status.get("output") or {}).get("digest", "-")[:19]])
    return _table(["stage", "phase", "reason", "attempts", "duration", "output digest"], rows)


def merge_table(data: RunData) -> str | None:
    merges = sorted(data.of_kind("Merge"), key=lambda s: s.name)
    if not merges:
        return None
    rows = []
    for m in merges:
        metrics = m.result.get("metrics") or m.status.get("metrics") or {}
        inputs = ", ".join(ref_key(r) or "?" for r in m.spec.get("models", []))
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        nested = {f"{k}.{kk}": vv for k, v in metrics.items() if isinstance(v, dict)
                  for kk, vv in v.items() if isinstance(vv, (int, float, str, bool))}
        stats = "; ".join(f"{k}={_scalar(v)}" for k, v in {**flat, **nested}.items())
        rows.append([m.name, m.spec.get("method", ""), f"base {ref_key(m.spec.get('base')) or '-'}; {inputs}",
                     fmt_duration(duration(m.status)), stats])
    return _table(["merge", "method", "inputs", "duration", "statistics"], rows)


def leaderboards(data: RunData) -> dict[str, dict]:
    """MergeSearch name -> its status summary (trialsDone, trialsTotal, trialsFailed, leaderboard, winner)."""
    return {s.name: s.status.get("metrics") or {} for s in sorted(data.of_kind("MergeSearch"), key=lambda s: s.name)
            if (s.status.get("metrics") or {}).get("leaderboard") is not None}


def trial_cells(entry: dict) -> list[str]:
    """rank, trial, method, parameters / order, objective, feasible, dev pass@1 per benchmark, retained gain."""
    params = ", ".join(f"{k}={_scalar(v)}" for k, v in sorted((entry.get("params") or {}).items()))
    order = " > ".join(entry.get("order") or [])
    scores = ", ".join(f"{b} {100 * v:.1f}" for b, v in (entry.get("scores") or {}).items())
    gains = ", ".join(f"{b} {_scalar(v)}" for b, v in (entry.get("retainedGain") or {}).items())
    return [str(entry.get("rank", "")), str(entry.get("number", "")), entry.get("method", ""),
            "; ".join(x for x in (params, order) if x) or "-", _scalar(entry.get("objective")),
            "yes" if entry.get("feasible", True) else "no", scores or "-", gains or "-"]


TRIAL_HEADER = ["rank", "trial", "method", "parameters / order", "objective", "feasible", "dev pass@1 (%)",
                "retained gain"]


def search_section(data: RunData) -> str | None:
    boards = leaderboards(data)
    if not boards:
        return None
    parts = []
    for name, summary in boards.items():
        winner = summary.get("winner")
        parts.append(f"<h3>{html.escape(name)}</h3><p>{summary.get('trialsDone', 0)} of "
                     f"{summary.get('trialsTotal', '?')} trials done, {summary.get('trialsFailed', 0)} failed; "
                     + (f"winner: trial {winner['number']} ({html.escape(winner['method'])})"
                        if winner else "no feasible trial") + ". Scored on the search's development split.</p>")
        parts.append(_table(TRIAL_HEADER, [trial_cells(e) for e in summary["leaderboard"]]))
    return "\n".join(parts)


# ---- cost -----------------------------------------------------------------------------------------

def stage_cost(stage: Stage) -> dict | None:
    """status.cost (all attempts, as the control plane measured it), else the stage's own report."""
    from .api.cost import clean_cost

    return clean_cost(stage.status.get("cost")) or clean_cost(stage.result.get("cost"))


def cost_cells(cost: dict | None) -> list[str]:
    from .api.cost import format_bytes

    if not cost:
        return ["-"] * 5
    return [fmt_duration(cost.get("wallSeconds")), f"{cost.get('cpuSeconds', 0):.1f}", str(cost.get("gpus", 0)),
            f"{cost.get('gpuSeconds', 0):.1f}", format_bytes(cost["peakMemoryBytes"])
            if cost.get("peakMemoryBytes") else "-"]


COST_HEADER = ["wall", "CPU-s", "GPUs", "GPU-s", "peak memory"]


def cost_table(data: RunData) -> str | None:
    """Cost per stage (a MergeSearch's trials are listed under the search's name) and the total."""
    from .api.cost import sum_costs

    rows, costs = [], []
    for key in sorted(data.stages, key=lambda k: (layers(data).get(k, 0), k)):
        stage = data.stages[key]
        cost = stage_cost(stage)
        if cost is None:
            continue
        costs.append(cost)
        label = f"{key} (trial of {stage.search})" if stage.search else key
        rows.append([label, str(cost.get("attempts", stage.status.get("attempts", 1)))] + cost_cells(cost))
    if not rows:
        return None
    rows.append(["total", ""] + cost_cells(sum_costs(costs)))
    return _table(["stage", "attempts"] + COST_HEADER, rows)


@dataclass
class Route:
    """How one model was made, and what that cost: ``train`` the BranchSFTs of this route, ``merge`` its
    merges (a MergeSearch: every trial). Stages both routes share (the base, the TeacherGens) are left out."""

    label: str
    model: str  # Kind/name of the model the route ends in
    train: dict | None
    merge: dict | None
    stages: list[str]


def _merge_inputs(stage: Stage) -> list[str]:
    """The models a Merge or MergeSearch combines. Not its ``base`` alone: a task-vector base is the shared
    backbone (Arcee Fusion's base is one of its models anyway)."""
    refs = stage.spec.get("models", []) + [b.get("model") for b in stage.spec.get("branches", []) or []]
    return [k for k in (ref_key(r) for r in refs if r) if k]


def _mixed_baselines(data: RunData, routes: list[Route]) -> list[Stage]:
    """The data-mixture retraining: BranchSFTs on several datasets, from the same base as the branches of a
    route, that are no branch themselves (a teacher's SFT on its own base is not one)."""
    branches = {k for r in routes for k in r.stages if k.startswith("BranchSFT/")}
    bases = {ref_key(data.stages[k].spec.get("base")) for k in branches if k in data.stages}
    return [b for b in data.of_kind("BranchSFT") if len(b.spec.get("data") or []) > 1 and b.key not in branches
            and ref_key(b.spec.get("base")) in bases]


def merge_routes(data: RunData) -> list[Route]:
    """The branch + merge route to each merged model that has an Eval: its merges back to the BranchSFTs
    that feed them (the branches), each counted once."""
    from .api.cost import sum_costs

    evaluated = {ref_key(e.spec.get("model")) for e in data.of_kind("Eval")}
    routes = []
    for final in data.of_kind("Merge") + data.of_kind("MergeSearch"):
        if final.key not in evaluated:
            continue
        merges, branches, todo = [], [], [final.key]
        while todo:
            key = todo.pop()
            stage = data.stages.get(key)
            if stage is None or key in merges or key in branches:
                continue
            if stage.kind == "BranchSFT":
                branches.append(key)
                continue
            merges.append(key)
            todo += _merge_inputs(stage)
        trials = [s.key for s in data.stages.values() if s.search and f"MergeSearch/{s.search}" in merges]
        merge_keys = merges + trials
        routes.append(Route(f"branch + merge: {final.name}", final.key,
                            sum_costs(stage_cost(data.stages[k]) for k in branches),
                            sum_costs(stage_cost(data.stages[k]) for k in merge_keys), branches + merge_keys))
    return routes


def _scores_of(data: RunData, model: str) -> dict[str, float]:
    for ev in data.of_kind("Eval"):
        if ref_key(ev.spec.get("model")) == model:
            results = eval_results(ev) or {}
            return {n: float(b["pass1"]) for n, b in (results.get("benchmarks") or {}).items() if "pass1" in b}
    return {}


def cost_comparison(data: RunData) -> str | None:
    """TinyR1's Table 2 shape: the mixed-data SFT beside each branch + merge route, cost and scores side by
    side. Only when both are in the pipeline."""
    from .api.cost import add_costs

    routes = merge_routes(data)
    mixed = _mixed_baselines(data, routes)
    if not mixed or not routes:
        return None
    baseline = [Route(f"mixed-data SFT: {b.name}", b.key, stage_cost(b), None, [b.key]) for b in mixed]
    everything = baseline + routes
    benches: list[str] = []
    scores = {r.model: _scores_of(data, r.model) for r in everything}
    for found in scores.values():
        benches += [b for b in found if b not in benches]
    gpu = any((add_costs(r.train, r.merge) or {}).get("gpuSeconds") for r in everything)
    unit, field_ = ("GPU-h", "gpuSeconds") if gpu else ("CPU-h", "cpuSeconds")

    def hours(cost: dict | None) -> str:
        if not cost:
            return "-"
        value = cost.get(field_, 0) / 3600
        return f"{value:.3g}" if value < 1000 else f"{value:.0f}"  # never 2.66e+03

    rows = []
    for r in everything:
        total = add_costs(r.train, r.merge)
        rows.append([r.label, hours(r.train), hours(r.merge), hours(total),
                     fmt_duration((total or {}).get("wallSeconds"))]
                    + [f"{scores[r.model][b] * 100:.1f}" if b in scores[r.model] else "-" for b in benches])
    table = _table(["model", f"training ({unit})", f"merging ({unit})", f"total ({unit})", "wall"]
                   + [f"{b} pass@1 (%)" for b in benches], rows)
    base_cost = (stage_cost(mixed[0]) or {}).get(field_, 0)
    lines = []
    for r in routes:
        merge = (r.merge or {}).get(field_, 0)
        total = (add_costs(r.train, r.merge) or {}).get(field_, 0)
        if base_cost > 0:
            lines.append(f"<li>{html.escape(r.label)}: merging costs {merge / base_cost:.1%} of the mixed-data "
                         f"retraining ({html.escape(mixed[0].name)}); branches and merges together "
                         f"{total / base_cost:.2f}x.</li>")
    return "\n".join([
        f"<p>As TinyR1's Table 2 (merging about 4 GPU-hours against 740 for retraining on the mixed data): the "
        f"cost in {unit} of each route and its eval scores. Stages both routes share (the base model, the "
        f"TeacherGens) are not counted; a MergeSearch counts all its trials.</p>", table,
        "<ul>" + "".join(lines) + "</ul>" if lines else ""])


# ---- decontamination ------------------------------------------------------------------------------

def _dataset_path(data: RunData, ref: dict | None) -> Path | None:
    """Local path of a dataset ref: its URI, or the output of the TeacherGen it names."""
    if not ref:
        return None
    uri = ref.get("uri")
    if ref.get("from"):
        upstream = data.stages.get(ref_key(ref) or "")
        uri = ((upstream.status.get("output") or {}).get("uri")
               if upstream and upstream.status.get("phase") == "Succeeded" else None)
    try:
        return local_path(uri) if uri else None
    except UnresolvableUri:
        return None


def decontamination_rows(data: RunData) -> list[list[str]]:
    """The overlap that remained between each training dataset (TeacherGen outputs, BranchSFT data read from
    URIs) and each benchmark scored in the run (Evals, MergeSearch dev splits), counted on the published files
    with the gate the training stage declared for that benchmark (else the defaults: 8-grams, 0.8)."""
    from .api.decontamination import DEFAULT_QUESTION_FIELDS
    from .trainer import decontamination as dc
    from .trainer.datasets import read_records
    from .trainer.errors import InvalidInput

    benchmarks: dict[str, tuple[str, dict]] = {}  # ref key -> (label, ref)
    for stage in data.of_kind("Eval") + data.of_kind("MergeSearch"):
        spec = stage.spec.get("eval", {}) if stage.kind == "MergeSearch" else stage.spec
        for b in spec.get("benchmarks") or []:
            key = ref_key(b.get("dataset"))
            if key and key not in benchmarks:
                benchmarks[key] = (f"{b.get('name', '?')} ({Path(key).name})", b["dataset"])
    training: list[tuple[str, Stage, dict]] = []  # (label, stage whose gate applies, dataset ref)
    for stage in sorted(data.of_kind("TeacherGen"), key=lambda s: s.name):
        training.append((f"{stage.key} output", stage, {"from": {"kind": "TeacherGen", "name": stage.name}}))
    for stage in sorted(data.of_kind("BranchSFT"), key=lambda s: s.name):
        for i, item in enumerate(stage.spec.get("data") or []):
            if item.get("uri"):
                training.append((f"{stage.key} spec.data[{i}]", stage, item))
    if not benchmarks or not training:
        return []
    gates: dict[tuple, object] = {}
    rows = []
    for label, stage, ref in training:
        path = _dataset_path(data, ref)
        try:
            records = read_records(path, label) if path else None
        except (InvalidInput, OSError):
            records = None
        declared = stage.spec.get("decontaminate") or {}
        gated = {ref_key(b) for b in declared.get("benchmarks") or []}
        for key, (bench_label, bench_ref) in benchmarks.items():
            settings = ((tuple(declared.get("questionFields") or DEFAULT_QUESTION_FIELDS),
                         int(declared.get("ngram", 8)), float(declared.get("nearDuplicate", 0.8)))
                        if key in gated else (DEFAULT_QUESTION_FIELDS, 8, 0.8))
            found = None
            bench_path = _dataset_path(data, bench_ref)
            if records is not None and bench_path is not None:
                if (key, settings) not in gates:
                    try:
                        questions = dc.load_questions(bench_path, settings[0], bench_label)
                        gates[key, settings] = dc.Gate(questions, ngram=settings[1], near=settings[2])
                    except (InvalidInput, OSError, ValueError):
                        gates[key, settings] = None
                if gates[key, settings] is not None:
                    found = dc.overlap(gates[key, settings], records)
            if found is None:  # a dataset or benchmark this machine cannot read (moved, another volume)
                continue
            rows.append([label, bench_label, f"yes (n={settings[1]})" if key in gated else "no"]
                        + [str(found[k]) for k in ("records", "exact", "near-duplicate", "ngram", "responses")])
    return rows


DECONTAMINATION_HEADER = ["training data", "benchmark", "gate", "records", "exact", "near-duplicate", "n-gram",
                          "in responses"]


def decontamination_section(data: RunData) -> str | None:
    rows = decontamination_rows(data)
    if not rows:
        return None
    classes = [["", "", "" if r[2] != "no" else "bad"] + ["num bad" if c != "0" and j > 0 else "num"
                                                          for j, c in enumerate(r[3:])] for r in rows]
    return ("<p>Benchmark questions still found in the published training data: records whose prompt side is "
            "an exact copy, a near-duplicate or shares an n-gram with a question, and records whose responses "
            "match one. Counted with the settings of the gate the stage declared for that benchmark "
            "(spec.decontaminate), else with the defaults (8-grams, near-duplicates from 0.8). A gated dataset "
            "should show zeros.</p>" + _table(DECONTAMINATION_HEADER, rows, classes))


def build_html(data: RunData) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>branchmerge report</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>branchmerge report</h1><p>workdir <code>{html.escape(str(data.workdir.root))}</code>, "
             f"{len(data.stages)} stage(s)</p>"]
    if not data.stages:
        parts.append("<p>No stages in this workdir yet.</p></body></html>")
        return "\n".join(parts)
    parts += ["<h2>Pipeline</h2>", _img(pipeline_figure(data), "pipeline graph")]
    timeline = timeline_figure(data)
    if timeline:
        parts.append(_img(timeline, "stage timings"))
    parts.append(stages_table(data))
    costs = cost_table(data)
    if costs:
        parts += ["<h2>Cost</h2>", "<p>Per stage, all attempts: wall time, CPU-seconds of all its processes, "
                  "GPU-seconds (GPUs x wall) and the peak memory of its largest process.</p>", costs]
        comparison = cost_comparison(data)
        if comparison:
            parts += ["<h3>Branch + merge against mixed-data retraining</h3>", comparison]
    rows = eval_rows(data)
    if rows:
        parts += ["<h2>Evaluation</h2>", "<p>pass@1 averaged over k samples per question, ± standard error "
                  "over questions; bold: best in the column.</p>", eval_table(rows)]
        figure = eval_figure(rows)
        if figure:
            parts.append(_img(figure, "eval scores"))
        kept = retention(rows)
        if kept:
            domains = list(dict.fromkeys(r.domain for r in kept))
            by = {(r.merge, r.domain): r for r in kept}
            merges = list(dict.fromkeys(r.merge for r in kept))
            parts += ["<h3>What each merge keeps of each branch's gain</h3>",
                      "<p>(merged - base) / (branch - base) on the branch's own benchmark: 1 keeps all of it, 0 "
                      "none, below 0 is worse than the base; in brackets the range over the eval seeds (sample j "
                      "of every question is one independently sampled run of the benchmark).</p>",
                      _table(["merge"] + domains, [[m] + [gain_text(by[m, d]) if (m, d) in by else "-"
                                                         for d in domains] for m in merges]),
                      "<ul>"]
            for claim, ok, detail in verdicts(kept):
                mark = '<span class="ok">yes</span>' if ok else '<span class="bad">no</span>'
                parts.append(f"<li>{html.escape(claim)}: {mark} <small>({html.escape(detail)})</small></li>")
            parts.append("</ul>")
    loss = loss_figure(data)
    if loss:
        parts += ["<h2>Training loss per branch</h2>", _img(loss, "training loss")]
    weights = domain_weights_section(data)
    if weights:
        parts += ["<h2>Domain weights (DDK)</h2>", weights]
    acc = acceptance_figure(data)
    if acc:
        parts += ["<h2>TeacherGen acceptance</h2>", _img(acc, "teachergen acceptance by reason")]
    searches = search_section(data)
    if searches:
        parts += ["<h2>Merge searches</h2>", searches]
    merges = merge_table(data)
    if merges:
        parts += ["<h2>Merges</h2>", merges]
    gate = decontamination_section(data)
    if gate:
        parts += ["<h2>Decontamination</h2>", gate]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(workdir: Workdir, out: str | Path | None = None) -> Path:
    """Write the page atomically (temp file + rename); returns its path."""
    path = Path(out) if out else workdir.root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = build_html(gather(workdir))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
