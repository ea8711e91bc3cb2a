"""MergeSearch as child CRs (operator/searchplan.py), driven by a tiny stand-in control plane.

The stand-in "runs" a child by marking it Succeeded: a Merge gets an output URI, an Eval gets pass@1 from a
known toy function of the Merge spec its model comes from. Every child the expansion asks for is checked
against the real API (schema + CEL) first.
"""
from __future__ import annotations

import json

import pytest

from branchmerge.api.validation import parse_resource
from branchmerge.api.labels import LABEL_SEARCH, LABEL_TRIAL
from branchmerge.operator.searchplan import (NO_FEASIBLE_TRIAL, REFERENCE_FAILED, SELECTION_ON_TEST, Child, expand,
                                             selection_on_test, warn_selection_on_test)

BRANCHES = [
    {"name": "math", "model": {"from": {"kind": "BranchSFT", "name": "math"}}, "benchmark": "math-dev"},
    {"name": "code", "model": {"from": {"kind": "BranchSFT", "name": "code"}}, "benchmark": "code-dev"},
]
BASE = {"uri": "file:///models/base"}
DEV = {"benchmarks": [{"name": "math-dev", "kind": "math", "dataset": {"uri": "file:///data/math-dev.jsonl"}},
                      {"name": "code-dev", "kind": "code", "dataset": {"uri": "file:///data/code-dev.jsonl"}}]}


def spec(**over) -> dict:
    doc = {"branches": BRANCHES, "base": BASE, "eval": DEV,
           "space": [{"method": "ties", "parameters": {"density": {"values": [0.2, 0.6, 1.0]}}},
                     {"method": "arcee_fusion"}],
           "budget": {"maxTrials": 10, "parallelism": 2}, "sampler": {"name": "grid"}}
    doc.update(over)
    return doc


def toy(merge_spec: dict) -> tuple[float, float]:
    if merge_spec["method"] == "ties":
        s = 0.8 - (merge_spec["parameters"]["density"] - 0.6) ** 2
        return s, s
    first = merge_spec["models"][0]["from"]["name"]
    return (0.5, 0.4) if first == "math" else (0.45, 0.45)


REFERENCE = {"file:///models/base": (0.3, 0.3), "math": (0.8, 0.2), "code": (0.2, 0.7)}


class StandIn:
    """Children by Kind/name, run one at a time, upstreams first."""

    def __init__(self, fail=lambda doc: False):
        self.docs: dict[str, dict] = {}
        self.children: dict[str, Child] = {}
        self.fail = fail
        self.created = 0

    def create(self, docs: list[dict]) -> None:
        for doc in docs:
            key = f"{doc['kind']}/{doc['metadata']['name']}"
            assert key not in self.children, f"{key} asked for twice"
            parse_resource(json.loads(json.dumps(doc)))  # a valid CR: schema and CEL
            self.docs[key], self.children[key] = doc, Child()
            self.created += 1

    def _ready(self, doc: dict) -> bool:
        ups = [m["from"]["name"] for m in doc["spec"].get("models", []) if "from" in m and m["from"]["kind"] == "Merge"]
        model = doc["spec"].get("model", {}).get("from", {})
        if model.get("kind") == "Merge":
            ups.append(model["name"])
        return all(self.children[f"Merge/{u}"].phase == "Succeeded" for u in ups)

    def step(self) -> bool:
        for key, child in self.children.items():
            doc = self.docs[key]
            if child.phase is None and self._ready(doc):
                # each child's status.cost: a Merge 10 CPU-s, an Eval 2 GPUs for 30 s
                child.cost = ({"wallSeconds": 12.0, "cpuSeconds": 10.0, "gpus": 0, "gpuSeconds": 0.0}
                              if doc["kind"] == "Merge" else
                              {"wallSeconds": 30.0, "cpuSeconds": 4.0, "gpus": 2, "gpuSeconds": 60.0})
                if self.fail(doc):
                    child.phase, child.message = "Failed", "exit 2: boom"
                elif doc["kind"] == "Merge":
                    child.phase, child.output = "Succeeded", {"uri": f"file:///out/{key}", "digest": "sha256:" + key}
                else:
                    model = doc["spec"]["model"]
                    if "uri" in model:
                        m, c = REFERENCE[model["uri"]]
                    elif model["from"]["kind"] == "BranchSFT":
                        m, c = REFERENCE[model["from"]["name"]]
                    else:
                        m, c = toy(self.docs[f"Merge/{model['from']['name']}"]["spec"])
                    child.phase = "Succeeded"
                    child.metrics = {"benchmarks": {"math-dev": {"pass1": m}, "code-dev": {"pass1": c}}}
                return True
        return False


def drive(doc: dict, standin: StandIn | None = None):
    standin = standin or StandIn()
    for _ in range(500):
        exp = expand("pick", doc, dict(standin.children), generation=1)
        running = sum(t["state"] == "Running" for t in exp.trials)
        assert running <= doc["budget"]["parallelism"]
        standin.create(exp.create)
        if exp.complete:
            return exp, standin
        assert exp.create or standin.step(), "stuck"
    raise AssertionError("did not finish")


def test_grid_runs_as_children_and_publishes_the_winner():
    exp, standin = drive(spec())
    assert exp.status["phase"] == "Succeeded"
    summary = exp.status["metrics"]
    assert summary["trialsDone"] == summary["trialsTotal"] == 5  # 3 densities + 2 orders
    win = summary["winner"]
    assert (win["method"], win["params"]) == ("ties", {"density": 0.6})
    winner_merge = next(t for t in exp.trials if t["id"] == win["id"])["children"][-2]
    assert exp.status["output"] == {"uri": f"file:///out/{winner_merge}", "digest": "sha256:" + winner_merge}
    assert [r["rank"] for r in summary["leaderboard"]] == [1, 2, 3, 4, 5]
    labels = {d["metadata"]["labels"][LABEL_SEARCH] for d in standin.docs.values()}
    assert labels == {"pick"}
    assert sum(d["metadata"]["labels"][LABEL_TRIAL] != "reference" for d in standin.docs.values()) == 10
    # the search's cost is that of every child it made: a Merge and an Eval per trial (no reference Evals for
    # this objective)
    merges = sum(k.startswith("Merge/") for k in standin.children)
    evals = sum(k.startswith("Eval/") for k in standin.children)
    assert (merges, evals) == (5, 5)
    assert exp.status["cost"] == {"wallSeconds": 12.0 * merges + 30.0 * evals, "cpuSeconds": 10.0 * merges
                                  + 4.0 * evals, "gpuSeconds": 60.0 * evals, "gpus": 2}


def test_a_rerun_over_the_same_children_reuses_every_result():
    exp, standin = drive(spec())
    again = expand("pick", spec(), dict(standin.children))
    assert again.create == [] and again.complete and again.status["output"] == exp.status["output"]
    # a larger budget re-uses the 5 trials and adds nothing (the grid has 5 points)
    bigger = expand("pick", spec(budget={"maxTrials": 20, "parallelism": 2}), dict(standin.children))
    assert bigger.create == [] and bigger.complete


def test_a_failing_trial_is_recorded_and_the_search_goes_on():
    fail = lambda d: d["kind"] == "Merge" and d["spec"]["method"] == "arcee_fusion"  # noqa: E731
    exp, _ = drive(spec(), StandIn(fail))
    failed = [t for t in exp.trials if t["state"] == "Failed"]
    assert len(failed) == 2 and all("failed: exit 2: boom" in t["message"] for t in failed)
    assert exp.status["phase"] == "Succeeded" and exp.status["metrics"]["trialsFailed"] == 2


def test_retained_gain_evaluates_the_references_once():
    doc = spec(objective={"name": "worstRetainedGain", "constraints": {"aboveBase": True}})
    exp, standin = drive(doc)
    refs = [d for d in standin.docs.values() if d["metadata"]["labels"][LABEL_TRIAL] == "reference"]
    assert len(refs) == 3
    win = exp.status["metrics"]["winner"]
    assert win["params"] == {"density": 0.6}
    # (0.8 - 0.3) / (0.8 - 0.3) = 1 on math, (0.8 - 0.3) / (0.7 - 0.3) = 1.25 on code
    assert win["retainedGain"] == {"math": 1.0, "code": 1.25} and win["objective"] == 1.0


def test_no_feasible_trial_and_failed_references_fail_the_search():
    doc = spec(base={"uri": "file:///models/strong"}, objective={"name": "meanPass1",
                                                                "constraints": {"aboveBase": True}})
    REFERENCE["file:///models/strong"] = (0.99, 0.99)
    try:
        exp, _ = drive(doc)
    finally:
        del REFERENCE["file:///models/strong"]
    assert exp.status["phase"] == "Failed"
    assert exp.status["conditions"][0]["reason"] == NO_FEASIBLE_TRIAL
    fail_base = lambda d: d["kind"] == "Eval" and d["spec"]["model"].get("uri") == BASE["uri"]  # noqa: E731
    exp, _ = drive(spec(objective={"name": "worstRetainedGain"}), StandIn(fail_base))
    assert exp.status["phase"] == "Failed" and exp.status["conditions"][0]["reason"] == REFERENCE_FAILED


def test_three_branch_chains_share_their_common_prefix():
    branches = BRANCHES + [{"name": "sci", "model": {"uri": "file:///m/sci"}, "benchmark": "code-dev"},
                           {"name": "law", "model": {"uri": "file:///m/law"}, "benchmark": "code-dev"}]
    doc = spec(branches=branches, space=[{"method": "arcee_fusion", "orders": [["math", "sci", "code", "law"],
                                                                              ["math", "sci", "law", "code"]]}])
    exp, standin = drive(doc)
    merges = [k for k in standin.docs if k.startswith("Merge/")]
    assert len(merges) == 3 + 3 - 1  # the (math + sci) step is one child for both orders
    a, b = (t["children"] for t in exp.trials)
    assert a[0] == b[0] and a[1] != b[1]
    assert standin.docs[a[1]]["spec"]["models"][0] == {"from": {"kind": "Merge", "name": a[0].split("/")[1]}}


def test_selection_on_the_test_set_is_warned():
    downstream = [
        {"kind": "Eval", "metadata": {"name": "final"},
         "spec": {"model": {"from": {"kind": "MergeSearch", "name": "pick"}}, "benchmarks": DEV["benchmarks"][:1]}},
        {"kind": "Eval", "metadata": {"name": "held-out"},
         "spec": {"model": {"from": {"kind": "MergeSearch", "name": "pick"}},
                  "benchmarks": [{"name": "math-test", "kind": "math", "dataset": {"uri": "file:///data/math-test.jsonl"}}]}},
    ]
    messages = selection_on_test("pick", spec(), downstream)
    assert len(messages) == 1 and "Eval final" in messages[0] and "math-dev" in messages[0]
    status: dict = {}
    warn_selection_on_test(status, messages)
    assert status["conditions"][0]["type"] == SELECTION_ON_TEST and status["conditions"][0]["status"] == "True"
    warn_selection_on_test(status, [])
    assert status["conditions"][0]["status"] == "False"


def test_a_bad_space_is_an_error_naming_the_field():
    from branchmerge.operator.search import SpaceError

    with pytest.raises(SpaceError, match=r"spec.space\[0\].method"):
        expand("pick", spec(space=[{"method": "nope"}]), {})


def test_output_root_places_the_children_without_renaming_them():
    plain = expand("pick", spec(), {})
    rooted = expand("pick", spec(outputRoot="pvc://claim/searches/"), {})
    assert [d["metadata"]["name"] for d in rooted.create] == [d["metadata"]["name"] for d in plain.create]
    for doc in rooted.create:
        assert doc["spec"]["output"] == {"uri": f"pvc://claim/searches/{doc['kind'].lower()}/{doc['metadata']['name']}"}
        parse_resource(json.loads(json.dumps(doc)))
    assert all("output" not in d["spec"] for d in plain.create)


def test_when_every_trial_fails_the_condition_says_why():
    """A branch that does not beat the base leaves the retained gain undefined for every trial: the search fails
    with that reason in its condition, not only a count."""
    REFERENCE["weak"] = (0.1, 0.1)
    branches = [BRANCHES[0], {**BRANCHES[1], "model": {"from": {"kind": "BranchSFT", "name": "weak"}}}]
    try:
        exp, _ = drive(spec(branches=branches, objective={"name": "worstRetainedGain"}))
    finally:
        del REFERENCE["weak"]
    ready = exp.status["conditions"][0]
    assert exp.status["phase"] == "Failed" and ready["reason"] == NO_FEASIBLE_TRIAL
    assert "(5 failed; trial 0: objective: branch code does not beat the base on code-dev (0.1000 vs 0.3000)" in \
        ready["message"], ready
