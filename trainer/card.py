"""Model cards: the README.md of every published model (BranchSFT, Merge; a MergeSearch's winner is a Merge).

A card is rendered from what the folders themselves record -- the output's lineage (trainer/lineage.py) and
its upstreams', the TeacherGen datasets' counts, the cost each stage reported at publication, and the Evals
of the model -- never edited in place. The stage writes it right after publishing; an Eval of the model adds
its scores under ``_card/evals/`` and renders the card again. Card and ``_card/`` stay out of the output's
digest (api/outputs.py), so a new score does not change the model's identity. Its YAML front matter is
the Hugging Face hub's (license, base_model, datasets, tags, model-index), so the hub shows the scores.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import uuid
from pathlib import Path

import yaml

from ..api.cost import format_bytes
from ..api.lineage import Node, read_lineage, render_tree, tree
from ..api.outputs import CARD, CARD_DIR, write_json_atomic
from ..api.timefmt import format_time
from ..api.uris import UnresolvableUri, local_path, parse_hf_uri

CARD_KINDS = ("BranchSFT", "Merge", "Eval")
TEACHERGEN_MANIFEST = "teachergen.json"  # trainer/teachergen/stage.py MANIFEST_FILE
EVAL_RESULTS = "results.json"  # trainer/eval/report.py RESULTS_JSON
MODEL_PATHS = ("spec.base", "spec.models")  # a model's own ancestors; a teacher is not one


def after_publish(resource, output_dir: Path) -> None:
    """The stage's hook, on rank 0 after publishing. A card that cannot be written (an Eval whose model is on a
    read-only volume) is reported, never fails the stage: the model and the scores are published already."""
    try:
        if resource.kind == "Eval":
            model = resource.spec.model
            if model is not None and model.uri:
                model_dir = local_path(model.uri)
                if read_lineage(model_dir) is not None:  # a published model: its card gets the scores
                    record_eval(model_dir, resource.name, output_dir)
        else:
            write_card(output_dir)
    except (OSError, UnresolvableUri) as err:
        print(f"branchmerge: model card not updated: {err}", file=sys.stderr)


@contextlib.contextmanager
def _card_lock(model_dir: Path):
    """Evals of one model may finish together: each adds its file and renders under the lock, so the last
    render sees every score."""
    folder = model_dir / CARD_DIR
    folder.mkdir(exist_ok=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_eval(model_dir: Path, eval_name: str, eval_dir: Path) -> None:
    """Add an Eval's scores of the model at ``model_dir`` and render its card again."""
    results = json.loads((Path(eval_dir) / EVAL_RESULTS).read_text())
    lineage = read_lineage(eval_dir) or {}
    entry = {"eval": eval_name, "uri": Path(eval_dir).resolve().as_uri(), "digest": lineage.get("digest"),
             "createdAt": results.get("createdAt"), "score": results.get("score"),
             "benchmarks": {name: {k: b.get(k) for k in ("pass1", "stderr", "samples", "n", "meanTokens",
                                                         "p95Tokens", "passAtK")}
                            for name, b in (results.get("benchmarks") or {}).items()}}
    with _card_lock(model_dir):
        write_json_atomic(model_dir / CARD_DIR / "evals" / f"{eval_name}.json", entry)
        _render_to(model_dir)


def write_card(model_dir: Path) -> None:
    with _card_lock(Path(model_dir)):
        _render_to(Path(model_dir))


def _render_to(model_dir: Path) -> None:
    text = render_card(model_dir)
    tmp = model_dir / f".{CARD}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, model_dir / CARD)


# ---- what the card says ---------------------------------------------------------------------------------


def evals_of(model_dir: Path) -> list[dict]:
    found = []
    for path in sorted((Path(model_dir) / CARD_DIR / "evals").glob("*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def _folder(node: Node) -> Path | None:
    try:
        return local_path(node.uri)
    except UnresolvableUri:
        return None


def _teachergen_counts(node: Node) -> dict:
    folder = _folder(node)
    try:
        manifest = json.loads((folder / TEACHERGEN_MANIFEST).read_text()) if folder else {}
    except (OSError, ValueError):
        manifest = {}
    return {"counts": manifest.get("counts") or {},
            "rejected": (manifest.get("acceptance") or {}).get("rejectedByReason") or {}}


def _hub_ids(root: Node) -> tuple[list[str], list[str]]:
    """hf:// repositories among the raw inputs: the models this one derives from (bases and merged models,
    not teachers) and the datasets."""
    models, datasets = [], []
    for node in root.walk():
        if node.record is not None or not node.uri.startswith("hf://"):
            continue
        try:
            hf = parse_hf_uri(node.uri)
        except UnresolvableUri:
            continue
        if hf.repo_type == "dataset" and hf.repo_id not in datasets:
            datasets.append(hf.repo_id)
        elif hf.repo_type == "model" and node.via.startswith(MODEL_PATHS) and hf.repo_id not in models:
            models.append(hf.repo_id)
    return models, datasets


def _licenses(root: Node) -> dict[str, str]:
    """Input URI -> the licence its card declares, over the whole tree."""
    found: dict[str, str] = {}
    for node in root.walk():
        for entry in (node.record or {}).get("inputs") or []:
            if entry.get("license"):
                found[entry["uri"]] = entry["license"]
    return found


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _hours(seconds) -> str:
    return "-" if seconds is None else f"{float(seconds) / 3600:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _stages_upstream_first(root: Node) -> list[Node]:
    """Each output of the tree once, those furthest from the model first (teacher, traces, branches, merges)."""
    depth: dict[str, int] = {}
    nodes: dict[str, Node] = {}

    def visit(node: Node, d: int) -> None:
        if node.record is None:
            return
        nodes.setdefault(node.label, node)
        depth[node.label] = max(depth.get(node.label, 0), d)
        for child in node.children:
            visit(child, d + 1)

    visit(root, 0)
    return [nodes[label] for label in sorted(nodes, key=lambda label: (-depth[label], label))]


def _recipe(root: Node) -> list[str]:
    lines: list[str] = []
    for node in _stages_upstream_first(root):
        rec, spec = node.record, node.record.get("spec") or {}
        kind = rec["kind"]
        if kind == "TeacherGen":
            teacher = spec.get("teacher") or {}
            endpoint = (teacher.get("engine") or {}).get("endpoint") or {}
            who = teacher.get("model", {}).get("uri") or endpoint.get("model") or "-"
            stats = _teachergen_counts(node)
            c = stats["counts"]
            rejected = ", ".join(f"{k} {v}" for k, v in sorted(stats["rejected"].items())) or "none"
            lines.append(f"- **TeacherGen `{rec['name']}`**: teacher `{who}`, prompts `{_prompts_uri(spec)}`; "
                         f"{c.get('samplesKept', '-')} traces kept of {c.get('samplesGenerated', '-')} generated "
                         f"(rejected: {rejected}).")
        elif kind == "BranchSFT":
            t, o = spec.get("training") or {}, spec.get("objective") or {}
            data = ", ".join(f"`{d.get('uri')}`" for d in spec.get("data") or [])
            objective = o.get("type", "sft") + (f" ({o.get('divergence')}, kdWeight {o.get('kdWeight')})"
                                                if o.get("type") == "kd" else "")
            lines.append(f"- **BranchSFT `{rec['name']}`** (domain {spec.get('domain') or '-'}): base "
                         f"`{(spec.get('base') or {}).get('uri')}`, data {data}; {objective}; epochs "
                         f"{t.get('epochs')}, learning rate {t.get('learningRate')} ({t.get('scheduler')}, warmup "
                         f"{t.get('warmupRatio')}), global batch {t.get('globalBatchSize')}, max length "
                         f"{t.get('maxSeqLen')}, packing {t.get('packing')}, {t.get('precision')}, seed "
                         f"{t.get('seed')}.")
        elif kind == "Merge":
            order = " ⊕ ".join(f"`{m.get('uri')}`" for m in spec.get("models") or [])
            params = json.dumps({k: v for k, v in (spec.get("parameters") or {}).items() if v not in ([], {})},
                                sort_keys=True)
            base = (spec.get("base") or {}).get("uri")
            lines.append(f"- **Merge `{rec['name']}`**: {spec.get('method')} of {order}"
                         + (f" on base `{base}`" if base else "") + f"; parameters {params}; dtype "
                         f"{spec.get('dtype')}, seed {spec.get('seed')}.")
    return lines


def _prompts_uri(spec: dict) -> str:
    return str(((spec.get("prompts") or {}).get("dataset") or {}).get("uri") or "-")


def _cost_rows(root: Node) -> tuple[list[list[str]], float, float]:
    rows, gpu_total, cpu_total = [], 0.0, 0.0
    for node in _stages_upstream_first(root):
        cost = node.record.get("cost") or {}
        gpu_total += float(cost.get("gpuSeconds") or 0)
        cpu_total += float(cost.get("cpuSeconds") or 0)
        peak = cost.get("peakMemoryBytes")
        rows.append([node.label, _fmt(cost.get("wallSeconds"), 1), _fmt(cost.get("cpuSeconds"), 1),
                     _hours(cost.get("gpuSeconds")), "-" if peak is None else format_bytes(peak)])
    return rows, gpu_total, cpu_total


def front_matter(root: Node, evals: list[dict], licenses: dict[str, str]) -> dict:
    models, datasets = _hub_ids(root)
    meta: dict = {}
    distinct = sorted(set(licenses.values()))
    if len(distinct) == 1:
        meta["license"] = distinct[0]
    elif distinct:
        meta["license"] = "other"  # the hub takes one; the card lists each input's
    if models:
        meta["base_model"] = models
    if datasets:
        meta["datasets"] = datasets
    kind = root.record["kind"]
    meta["tags"] = ["branchmerge", "merge" if kind == "Merge" else "distillation"]
    if root.record.get("kind") == "Merge":
        meta["tags"].append("mergekit-compatible")
    results = [{"task": {"type": "text-generation"}, "dataset": {"name": name, "type": name},
                "metrics": [{"type": "pass@1", "value": b.get("pass1"),
                             "name": f"pass@1 ({e['eval']}, {b.get('samples')} samples)"}]}
               for e in evals for name, b in sorted((e.get("benchmarks") or {}).items())
               if b.get("pass1") is not None]
    if results:
        meta["model-index"] = [{"name": root.record["name"], "results": results}]
    return meta


def render_card(model_dir: Path) -> str:
    model_dir = Path(model_dir)
    root = tree(model_dir.resolve().as_uri())
    if root.record is None:
        raise OSError(f"{model_dir}: not a published output with a lineage")
    rec = root.record
    evals = evals_of(model_dir)
    licenses = _licenses(root)
    out = ["---", yaml.safe_dump(front_matter(root, evals, licenses), sort_keys=False).rstrip(), "---", ""]
    what = {"BranchSFT": f"a branch of the student fine-tuned on the "
                         f"{(rec.get('spec') or {}).get('domain') or 'its'} domain",
            "Merge": f"a merge ({(rec.get('spec') or {}).get('method')}) of domain experts"}.get(rec["kind"], rec["kind"])
    out += [f"# {rec['name']}", "",
            f"{rec['name']} is {what}, made with branchmerge's Branch-Merge distillation "
            f"({rec['kind']} `{rec['name']}`; output digest `{root.digest}`).", ""]
    out += ["## Scores", ""]
    rows = [[e["eval"], name, _fmt(b.get("pass1")), _fmt(b.get("stderr")), _fmt(b.get("samples")),
             _fmt(b.get("n")), _fmt(b.get("meanTokens"), 1)]
            for e in evals for name, b in sorted((e.get("benchmarks") or {}).items())]
    out += (_table(["eval", "benchmark", "pass@1", "stderr", "samples (k)", "questions", "mean output tokens"],
                   rows) if rows else ["No Eval of this model had finished when the card was written."])
    out += ["", "## Recipe", ""] + _recipe(root)
    cost_rows, gpu_total, cpu_total = _cost_rows(root)
    out += ["", "## Cost", "", "What each stage had used when it published (retries not included).", ""]
    out += _table(["stage", "wall s", "CPU s", "GPU h", "peak memory"], cost_rows)
    out += ["", f"Total: {gpu_total / 3600:.3f} GPU-hours, {cpu_total / 3600:.3f} CPU-hours."]
    out += ["", "## Lineage", "", "```", render_tree(root), "```"]
    out += ["", "## Licences", ""]
    out += ([f"- `{uri}`: {lic}" for uri, lic in sorted(licenses.items())]
            or ["No input declares a licence: check the licences of the base model, teacher and datasets."])
    code, libs = rec.get("code") or {}, rec.get("libraries") or {}
    out += ["", "## Reproduce", "",
            f"- branchmerge {code.get('branchmerge', '-')}" + (f" (commit {code['commit']})" if code.get("commit")
                                                               else ""),
            "- " + ", ".join(f"{k} {v}" for k, v in sorted(libs.items())),
            "- seeds: " + (", ".join(f"{k} = {v}" for k, v in sorted((rec.get("seeds") or {}).items())) or "none"),
            "- scores depend on the hardware's float kernels: the same recipe on another machine gives other "
            "numbers; the same machine gives identical outputs.",
            "", f"_Card rendered {format_time()} from `_manifest.json` "
            "lineage; regenerated when an Eval of this model finishes._", ""]
    return "\n".join(out)
