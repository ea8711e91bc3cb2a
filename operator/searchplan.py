"""MergeSearch as child CRs: what to create, what the trials are, what the status says. Pure (plain dicts).

Both drivers call ``expand(name, spec, children)`` with the children that exist ("Kind/name" -> what was
observed: phase, metrics, output) and apply its answer: the operator creates the missing children as owned
Merge and Eval CRs, the local runner adds them to its DAG as stages. Nothing else is stored: the trials are
*replayed* from the seed every time -- a trial's point depends only on the seed and the finished trials
before it (operator/search.py), and a trial's result is its children's -- so a restarted operator, or a
rerun ``branchmerge run`` whose children are cached, continues the same search.

Children are named by what they compute: a Merge step by the hash of its spec (a chain's later steps name
their predecessor, so trials sharing a chain prefix share its Merges), an Eval by the hash of its spec.
Same spec, same child, reused result.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..api import conditions as cond
from ..api.common import API_VERSION, TERMINAL
from ..api.cost import sum_costs
from ..api.graph import ref_key
from ..api.labels import LABEL_SEARCH, LABEL_TRIAL
from .search import FAILED, RUNNING, STEP_REF, SUCCEEDED, ObjectiveError, Search

SELECTION_ON_TEST = "SelectionOnTestData"  # condition type and event reason of the warning
NO_FEASIBLE_TRIAL = "NoFeasibleTrial"
REFERENCE_FAILED = "ReferenceFailed"
SEARCHING = "Searching"
PREFIX = 40  # characters of the search's name kept in child names (<= 63 in all, see naming.MAX_CHILD_NAME)


@dataclass
class Child:
    """A child as observed: ``phase`` None while it exists without a status."""

    phase: str | None = None
    metrics: dict = field(default_factory=dict)
    output: dict = field(default_factory=dict)  # {uri, digest}
    message: str = ""
    cost: dict | None = None  # its status.cost


@dataclass
class Expansion:
    create: list[dict]  # child manifests to create (missing ones; upstream-first order)
    trials: list[dict]  # the replayed trials, with states
    status: dict  # phase, conditions, output (the winner's), metrics (the summary)
    complete: bool


def _digest(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:10]


def _child_name(search: str, tag: str, doc) -> str:
    return f"{search[:PREFIX].rstrip('-')}-{tag}-{_digest(doc)}"


def _manifest(kind: str, name: str, search: str, trial: str, spec: dict, root: str | None = None) -> dict:
    if root:  # after naming: where a child writes is not part of what it computes
        spec = {**spec, "output": {"uri": f"{root.rstrip('/')}/{kind.lower()}/{name}"}}
    return {"apiVersion": API_VERSION, "kind": kind,
            "metadata": {"name": name, "labels": {LABEL_SEARCH: search[:63], LABEL_TRIAL: trial}}, "spec": spec}


def trial_children(search: Search, name: str, trial: dict) -> list[dict]:
    """The trial's Merge steps (a chain names its predecessor with ``from``) and its development Eval."""
    steps = search.merge_steps(trial["candidate"], trial["params"], trial.get("order"))
    out: list[dict] = []
    for step in steps:
        models = [{"from": {"kind": "Merge", "name": out[m[STEP_REF]]["metadata"]["name"]}} if STEP_REF in m else m
                  for m in step["models"]]
        spec = {**step, "models": models}
        out.append(_manifest("Merge", _child_name(name, "m", spec), name, trial["id"], spec, search.output_root))
    eval_spec = search.eval_spec({"from": {"kind": "Merge", "name": out[-1]["metadata"]["name"]}})
    out.append(_manifest("Eval", _child_name(name, "e", eval_spec), name, trial["id"], eval_spec, search.output_root))
    return out


def reference_children(search: Search, name: str) -> dict[str, dict]:
    """label -> the development Eval of a model the objective compares with (the base, each branch)."""
    out = {}
    for label, model in search.references().items():
        spec = search.eval_spec(model)
        out[label] = _manifest("Eval", _child_name(name, "r", spec), name, "reference", spec, search.output_root)
    return out


def _key(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def expand(name: str, spec: dict, children: dict[str, Child], generation: int | None = None) -> Expansion:
    """Replay the search over the observed children; SpaceError (from Search.from_spec) for a bad spec."""
    search = Search.from_spec(spec, name)
    create: list[dict] = []
    refs = reference_children(search, name)
    ref_metrics: dict[str, dict] = {}
    ref_failed = []
    for label, doc in refs.items():
        child = children.get(_key(doc))
        if child is None:
            create.append(doc)
        elif child.phase == SUCCEEDED:
            ref_metrics[label] = child.metrics
        elif child.phase == FAILED:
            ref_failed.append(f"{label} ({_key(doc)}): {child.message}".rstrip(": "))
    ready = ref_metrics if len(ref_metrics) == len(refs) else None
    trials: list[dict] = []
    while True:
        new = search.propose(trials)
        if not new:
            break
        for trial in new:
            trials.append(_observe(search, name, trial, children, ready, create))
    status = _status(search, name, trials, children, ref_failed, generation)
    return Expansion(create, trials, status, status["phase"] in TERMINAL)


def _observe(search: Search, name: str, trial: dict, children: dict[str, Child], ref_metrics: dict | None,
             create: list[dict]) -> dict:
    """The trial's state from its children; the missing ones go to ``create`` (each once)."""
    docs = trial_children(search, name, trial)
    trial = {**trial, "children": [_key(d) for d in docs]}
    queued = {_key(d) for d in create}
    for doc in docs:
        child = children.get(_key(doc))
        if child is None:
            if _key(doc) not in queued:
                create.append(doc)
            return {**trial, "state": RUNNING}
        if child.phase == FAILED:
            return search.fail(trial, f"{_key(doc)} failed: {child.message}".rstrip(": "))
        if child.phase != SUCCEEDED:
            return {**trial, "state": RUNNING}
    if ref_metrics is None:  # scored once the base/branch Evals are in
        return {**trial, "state": RUNNING}
    scored = search.score(trial, children[_key(docs[-1])].metrics, ref_metrics)
    if scored["state"] == SUCCEEDED:
        scored["output"] = dict(children[_key(docs[-2])].output)
    return scored


def _status(search: Search, name: str, trials: list[dict], children: dict[str, Child], ref_failed: list[str],
            generation: int | None) -> dict:
    summary = search.summary(trials)
    status: dict = {"metrics": summary}
    # what the search has cost: every child it made (trial Merges and Evals, the reference Evals), all attempts
    cost = sum_costs(c.cost for c in children.values() if c.cost)
    if cost:
        status["cost"] = cost
    if ref_failed:
        cond.set_phase(status, "Failed", REFERENCE_FAILED, "the objective's reference Evals failed: "
                       + "; ".join(ref_failed), generation)
        return status
    if not search.complete(trials):
        running = sum(t["state"] not in TERMINAL for t in trials)
        cond.set_phase(status, "Running", SEARCHING, f"{summary['trialsDone']}/{summary['trialsTotal']} trials done, "
                                                     f"{running} running", generation)
        status["progress"] = {"fraction": round(summary["trialsDone"] / max(1, summary["trialsTotal"]), 4),
                              "message": f"{summary['trialsDone']}/{summary['trialsTotal']} trials"}
        return status
    winner = summary["winner"]
    if winner is None:
        failed = [t for t in trials if t["state"] == FAILED]
        # when every trial failed the reason is theirs (often one cause: a branch that does not beat the base)
        why = f"; trial {failed[0]['number']}: {failed[0].get('message', 'failed')}" if failed else ""
        cond.set_phase(status, "Failed", NO_FEASIBLE_TRIAL,
                       f"no trial of {len(trials)} satisfied the constraints"
                       + (f" ({summary['trialsFailed']} failed{why})" if summary["trialsFailed"] else ""), generation)
        return status
    best = next(t for t in trials if t["id"] == winner["id"])
    status["output"] = best["output"]
    status["progress"] = {"fraction": 1.0, "message": f"winner: trial {winner['number']} ({winner['method']})"}
    cond.set_phase(status, "Succeeded", cond.SUCCEEDED,
                   f"winner: trial {winner['number']}, {winner['method']} {json.dumps(winner['params'], sort_keys=True)}"
                   f"{' order ' + '>'.join(winner['order']) if winner.get('order') else ''}, objective "
                   f"{winner['objective']:.4f} ({search.objective})", generation)
    return status


# ---- selection on the test set ---------------------------------------------------------------------------

def _dataset_ids(eval_spec: dict) -> dict[str, str]:
    """Identity of each benchmark's data (uri, or the upstream CR it comes from) -> benchmark name."""
    out = {}
    for b in eval_spec.get("benchmarks") or []:
        ident = ref_key(b.get("dataset"))
        if ident:
            out[ident] = b.get("name", "?")
    return out


def selection_on_test(name: str, spec: dict, resources: list[dict]) -> list[str]:
    """Messages for each Eval downstream of this MergeSearch that benchmarks on the search's own data: its
    score is then the search's selection score, not a held-out estimate."""
    ours = _dataset_ids(spec.get("eval") or {})
    messages = []
    for res in resources:
        if res.get("kind") != "Eval" or ref_key((res.get("spec") or {}).get("model")) != f"MergeSearch/{name}":
            continue
        shared = sorted(f"{ours[i]} = {res['metadata']['name']}'s {b}" for i, b in _dataset_ids(res["spec"]).items()
                        if i in ours)
        if shared:
            messages.append(f"Eval {res['metadata']['name']} scores the winner on the search's development data "
                            f"({', '.join(shared)}): selection on the test set; hold out a separate split")
    return messages


def warn_selection_on_test(status: dict, messages: list[str], generation: int | None = None) -> None:
    """The warning as a condition (True while some downstream Eval shares the search's data)."""
    if messages:
        cond.set_condition(status, SELECTION_ON_TEST, True, SELECTION_ON_TEST, "; ".join(messages), generation)
    elif cond.get_condition(status, SELECTION_ON_TEST):
        cond.set_condition(status, SELECTION_ON_TEST, False, "HeldOut", "", generation)


__all__ = ["Child", "Expansion", "ObjectiveError", "expand", "reference_children", "selection_on_test",
           "trial_children", "warn_selection_on_test"]
