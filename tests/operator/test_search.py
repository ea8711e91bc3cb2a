"""MergeSearch's core (operator/search.py): samplers, budget, identity, objective, failures, restarts.

The "runs" here are a known toy function of the merge parameters standing in for Merge + Eval, so the
optimum is known; everything the search decides is the real code.
"""
from __future__ import annotations

import json

import pytest

from branchmerge.api.validation import parse_resource
from branchmerge.operator import search as search_module
from branchmerge.operator.search import FAILED, STEP_REF, SUCCEEDED, Search, SpaceError

BRANCHES = [
    {"name": "math", "model": {"from": {"kind": "BranchSFT", "name": "math"}}, "benchmark": "math-dev"},
    {"name": "code", "model": {"from": {"kind": "BranchSFT", "name": "code"}}, "benchmark": "code-dev"},
]
BASE = {"uri": "file:///models/base"}
EVAL = {"benchmarks": [{"name": "math-dev", "kind": "math", "dataset": {"uri": "file:///data/math-dev.jsonl"}},
                       {"name": "code-dev", "kind": "code", "dataset": {"uri": "file:///data/code-dev.jsonl"}}]}
SPACE = [
    {"method": "ties", "parameters": {"density": {"values": [0.2, 0.6, 1.0]},
                                      "lambda": {"min": 0.5, "max": 1.5, "step": 0.5}}},
    {"method": "linear", "weights": {"math": {"min": 0.25, "max": 1.0, "step": 0.25}, "code": 1.0}},
    {"method": "arcee_fusion"},
]


def spec(**over) -> dict:
    doc = {"branches": BRANCHES, "base": BASE, "space": SPACE, "eval": EVAL,
           "budget": {"maxTrials": 100, "parallelism": 1}, "sampler": {"name": "grid"}}
    doc.update(over)
    return doc


def toy_metrics(trial: dict) -> dict:
    """A known objective: ties at density 0.6, lambda 1.0 is the best merge (0.9 on both benchmarks)."""
    p = trial["params"]
    if trial["method"] == "ties":
        s = 0.9 - (p["density"] - 0.6) ** 2 - 0.1 * (p["lambda"] - 1.0) ** 2
        m, c = s, s
    elif trial["method"] == "linear":
        m, c = 0.2 + 0.4 * p["weight.math"], 0.6 - 0.2 * p["weight.math"]
    else:
        m, c = (0.5, 0.4) if trial["order"][0] == "math" else (0.45, 0.45)
    return {"benchmarks": {"math-dev": {"pass1": m}, "code-dev": {"pass1": c}}}


REFS = {"base": {"benchmarks": {"math-dev": {"pass1": 0.3}, "code-dev": {"pass1": 0.3}}},
        "branch-math": {"benchmarks": {"math-dev": {"pass1": 0.8}, "code-dev": {"pass1": 0.2}}},
        "branch-code": {"benchmarks": {"math-dev": {"pass1": 0.2}, "code-dev": {"pass1": 0.7}}}}


def drive(doc: dict, run=toy_metrics, restart: bool = False, fail=lambda t: False) -> tuple[Search, list[dict]]:
    """Run a search to the end. restart: a fresh Search and JSON-round-tripped trials every round, as an
    operator restarted between reconciles sees them."""
    search = Search.from_spec(doc, "s")
    trials: list[dict] = []
    for _ in range(1000):
        if restart:  # a new process: nothing remembered but the recorded trials
            search_module._TPE_MEMO.clear()
            search, trials = Search.from_spec(json.loads(json.dumps(doc)), "s"), json.loads(json.dumps(trials))
        new = search.propose(trials)
        running = sum(t["state"] not in (SUCCEEDED, FAILED) for t in trials) + len(new)
        assert running <= search.parallelism
        trials += new
        pending = [i for i, t in enumerate(trials) if t["state"] not in (SUCCEEDED, FAILED)]
        if not pending:
            assert search.complete(trials)
            return search, trials
        i = pending[0]  # finish the oldest running trial
        trials[i] = (search.fail(trials[i], "merge exited 2") if fail(trials[i])
                     else search.score(trials[i], run(trials[i]), REFS))
    raise AssertionError("search did not finish")


def test_grid_enumerates_the_space_and_finds_the_known_optimum():
    search, trials = drive(spec())
    assert len(trials) == search.grid_size() == 9 + 4 + 2  # ties 3x3, linear 4, arcee 2 orders
    assert len({t["id"] for t in trials}) == len(trials)
    win = search.summary(trials)["winner"]
    assert (win["method"], win["params"]) == ("ties", {"density": 0.6, "lambda": 1.0})
    assert win["objective"] == pytest.approx(0.9)
    board = search.summary(trials)["leaderboard"]
    assert [r["rank"] for r in board] == [1, 2, 3, 4, 5]
    assert [r["objective"] for r in board] == sorted((r["objective"] for r in board), reverse=True)


def test_budget_is_honoured_and_parallelism_bounds_running_trials():
    for sampler in ("grid", "random", "tpe"):
        search, trials = drive(spec(budget={"maxTrials": 5, "parallelism": 2}, sampler={"name": sampler, "seed": 3}))
        assert len(trials) == 5, sampler
        assert search.summary(trials)["trialsDone"] == 5
        assert search.summary(trials)["trialsTotal"] == 5


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_samplers_are_reproducible_per_seed_and_across_restarts(sampler):
    doc = spec(budget={"maxTrials": 10, "parallelism": 2}, sampler={"name": sampler, "seed": 7, "startupTrials": 3})
    _, first = drive(doc)
    _, again = drive(doc, restart=True)
    assert [t["id"] for t in first] == [t["id"] for t in again]
    assert len({t["id"] for t in first}) == 10  # no trial twice
    _, other = drive(spec(budget={"maxTrials": 10, "parallelism": 2}, sampler={"name": sampler, "seed": 8,
                                                                            "startupTrials": 3}))
    assert [t["id"] for t in other] != [t["id"] for t in first]


def test_tpe_learns_from_history_on_a_continuous_space():
    """After random startup trials, TPE concentrates near the optimum of a smooth toy objective."""
    doc = spec(space=[{"method": "ties", "parameters": {"density": {"min": 0.05, "max": 1.0},
                                                         "lambda": {"min": 0.5, "max": 1.5}}}],
               budget={"maxTrials": 24, "parallelism": 1}, sampler={"name": "tpe", "seed": 0, "startupTrials": 6})
    search, trials = drive(doc)
    late = [abs(t["params"]["density"] - 0.6) for t in trials[12:]]
    early = [abs(t["params"]["density"] - 0.6) for t in trials[:6]]
    assert sum(late) / len(late) < sum(early) / len(early)
    assert search.winner(trials)["objective"] > 0.89


def test_a_failed_trial_is_recorded_and_the_search_goes_on():
    bad = lambda t: t["method"] == "ties" and t["params"]["density"] == 0.6  # noqa: E731 (the optimum fails)
    search, trials = drive(spec(), fail=bad)
    failed = [t for t in trials if t["state"] == FAILED]
    assert len(failed) == 3 and all(t["message"] == "merge exited 2" for t in failed)
    assert len(trials) == 15
    summary = search.summary(trials)
    assert summary["trialsFailed"] == 3
    assert summary["winner"]["params"]["density"] != 0.6
    assert all(r["id"] not in {t["id"] for t in failed} for r in summary["leaderboard"])
    # tpe learns from failed trials too (as Optuna FAIL trials)
    _, tpe = drive(spec(budget={"maxTrials": 8, "parallelism": 1}, sampler={"name": "tpe", "startupTrials": 2}),
                   fail=lambda t: t["method"] == "linear", restart=True)
    assert len(tpe) == 8


def test_worst_retained_gain_with_the_above_base_constraint():
    search, trials = drive(spec(objective={"name": "worstRetainedGain", "constraints": {"aboveBase": True}}))
    assert set(search.references()) == {"base", "branch-math", "branch-code"}
    linear_full = next(t for t in trials if t["method"] == "linear" and t["params"]["weight.math"] == 1.0)
    # math (0.6 - 0.3) / (0.8 - 0.3) = 0.6; code (0.4 - 0.3) / (0.7 - 0.3) = 0.25 -> worst 0.25
    assert linear_full["retainedGain"] == {"math": 0.6, "code": 0.25}
    assert linear_full["objective"] == 0.25 and linear_full["feasible"]
    linear_low = next(t for t in trials if t["method"] == "linear" and t["params"]["weight.math"] == 0.25)
    # math 0.3 is not above the base's 0.3: a tie violates "above"
    assert linear_low["scores"]["math-dev"] == pytest.approx(0.3) and not linear_low["feasible"]
    assert search.summary(trials)["leaderboard"][0]["feasible"]
    win = search.winner(trials)
    assert win["method"] == "ties" and win["params"] == {"density": 0.6, "lambda": 1.0}


def test_infeasible_trials_never_win():
    worse = dict(REFS, base={"benchmarks": {"math-dev": {"pass1": 0.95}, "code-dev": {"pass1": 0.1}}})
    search = Search.from_spec(spec(objective={"name": "meanPass1", "constraints": {"aboveBase": True}}), "s")
    trials = search.propose([])
    trials = [search.score(t, toy_metrics(t), worse) for t in trials]
    assert not trials[0]["feasible"] and search.winner(trials) is None
    assert search.leaderboard(trials)[0]["feasible"] is False


def test_identity_is_the_resolved_merge_spec():
    search = Search.from_spec(spec(), "s")
    a = search.trial_id(0, {"density": 0.6, "lambda": 1.0}, None)
    assert a == search.trial_id(0, {"lambda": 1.0, "density": 0.6}, None)
    assert a != search.trial_id(0, {"density": 0.6, "lambda": 1.5}, None)
    other = Search.from_spec(spec(merge={"dtype": "bfloat16"}), "s")
    assert other.trial_id(0, {"density": 0.6, "lambda": 1.0}, None) != a  # merge settings are part of it
    # a trial already recorded is never proposed again (its result is reused instead)
    first = search.propose([])
    assert search.propose([dict(first[0], state=SUCCEEDED, objective=0.1)])[0]["id"] != first[0]["id"]


def test_every_trial_is_a_valid_merge_manifest():
    """Each step the search generates passes the Merge API (schema and CEL), chains included."""
    search, trials = drive(spec())
    for t in trials:
        steps = search.merge_steps(t["candidate"], t["params"], t.get("order"))
        assert len(steps) == 1  # two branches: one Merge, also for the pairwise chain
        for k, step in enumerate(steps):
            doc = json.loads(json.dumps(step).replace(json.dumps({STEP_REF: 0}),
                                                      json.dumps({"from": {"kind": "Merge", "name": "s-step0"}})))
            parse_resource({"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge",
                            "metadata": {"name": f"s-{t['id']}-{k}"}, "spec": doc})


def test_three_branch_chain_follows_the_order():
    three = BRANCHES + [{"name": "sci", "model": {"uri": "file:///m/sci"}, "benchmark": "code-dev"}]
    search = Search.from_spec(spec(branches=three, space=[{"method": "arcee_fusion",
                                                           "orders": [["math", "sci", "code"]]}]), "s")
    assert search.grid_size() == 1
    steps = search.merge_steps(0, {}, ["math", "sci", "code"])
    assert steps[0]["models"] == [BRANCHES[0]["model"], {"uri": "file:///m/sci"}]
    assert steps[0]["base"] == {"uri": "file:///m/sci"}  # TinyR1: (Math + Science) on Science
    assert steps[1]["models"] == [{STEP_REF: 0}, BRANCHES[1]["model"]] and steps[1]["base"] == BRANCHES[1]["model"]
    assert len(Search.from_spec(spec(branches=three, space=[{"method": "arcee_fusion"}]), "s").candidates[0].orders) == 6


@pytest.mark.parametrize("over, path", [
    ({"space": [{"method": "nope"}]}, "spec.space[0].method"),
    ({"space": [{"method": "linear", "parameters": {"density": 0.5}}]}, "spec.space[0].parameters.density"),
    ({"space": [{"method": "ties", "parameters": {"density": {"min": 0.1, "max": 0.9}}}]},
     "spec.space[0].parameters.density"),  # grid over a continuous range
    ({"space": [{"method": "ties", "parameters": {"density": {"min": 0.9, "max": 0.1}}}]},
     "spec.space[0].parameters.density"),
    ({"space": [{"method": "arcee_fusion", "orders": [["math", "math"]]}]}, "spec.space[0].orders[0]"),
    ({"space": [{"method": "linear", "orders": [["math", "code"]]}]}, "spec.space[0].orders"),
    ({"space": [{"method": "slerp"}]}, "spec.space[0].parameters.t"),
    ({"space": [{"method": "linear", "weights": {"physics": 1.0}}]}, "spec.space[0].weights.physics"),
    ({"base": None, "space": [{"method": "ties", "parameters": {"density": 0.5}}]}, "spec.space[0].method"),
    ({"space": [{"method": "della", "parameters": {"density": 0.5, "epsilon": {"values": [0.1, 0.6]}}}]},
     "spec.space[0].parameters.epsilon"),  # outside the Merge API's bounds (epsilon < 0.5)
    ({"space": [{"method": "nuslerp", "parameters": {"nuslerpFlatten": {"values": [1.5]}}}]},
     "spec.space[0].parameters.nuslerpFlatten"),  # a number for a boolean
    ({"budget": {"maxTrials": 2, "parallelism": 3}}, "spec.budget.parallelism"),
    ({"sampler": {"name": "annealing"}}, "spec.sampler.name"),
    ({"objective": {"name": "worstRetainedGain"}, "branches": [dict(BRANCHES[0], benchmark="x"), BRANCHES[1]]},
     "spec.branches[0].benchmark"),
])
def test_bad_spaces_name_the_field(over, path):
    with pytest.raises(SpaceError) as err:
        Search.from_spec(spec(**over), "s")
    assert err.value.path == path


def test_branch_without_gain_fails_the_trial_with_a_reason():
    refs = dict(REFS, **{"branch-code": {"benchmarks": {"math-dev": {"pass1": 0.2}, "code-dev": {"pass1": 0.3}}}})
    search = Search.from_spec(spec(objective={"name": "worstRetainedGain"}), "s")
    trial = search.score(search.propose([])[0], toy_metrics(search.propose([])[0]), refs)
    assert trial["state"] == FAILED and "branch code does not beat the base on code-dev" in trial["message"]


def test_importing_the_search_stays_light():
    """Optuna (and numpy under it) load only when a tpe search proposes: the operator's import stays small."""
    import subprocess
    import sys

    code = ("import sys, branchmerge.operator.search\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('optuna', 'numpy', 'torch'))\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_every_merge_parameter_of_the_registry_is_searchable():
    """The newer methods' own parameters (della's epsilon, breadcrumbs' gamma, sce's selectTopk, karcher's
    integer maxIter, nuslerp's flags) are searched like density, and every trial is a valid Merge."""
    space = [{"method": "della", "parameters": {"density": 0.5, "epsilon": {"min": 0.05, "max": 0.3}}},
             {"method": "breadcrumbs", "parameters": {"density": 0.9, "gamma": {"values": [0.01, 0.05]}}},
             {"method": "sce", "parameters": {"selectTopk": {"min": 0.2, "max": 1.0}}},
             {"method": "karcher", "parameters": {"maxIter": {"min": 2, "max": 40}, "tol": {"min": 1e-6, "max": 1e-3,
                                                                                          "log": True}}},
             {"method": "nuslerp", "parameters": {"nuslerpFlatten": {"values": [True, False]}}}]
    flat = {"benchmarks": {"math-dev": {"pass1": 0.5}, "code-dev": {"pass1": 0.5}}}
    search, trials = drive(spec(space=space, sampler={"name": "random", "seed": 3}, budget={"maxTrials": 30}),
                           run=lambda t: flat)
    seen = {t["method"] for t in trials}
    assert {"della", "breadcrumbs", "sce", "karcher", "nuslerp"} <= seen
    for t in trials:
        [step] = search.merge_steps(t["candidate"], t["params"], t.get("order"))
        parse_resource({"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge",
                        "metadata": {"name": f"s-{t['id']}"}, "spec": step})
        params = step.get("parameters", {})
        if t["method"] == "karcher":
            assert isinstance(params["maxIter"], int) and 2 <= params["maxIter"] <= 40 and 1e-6 <= params["tol"] <= 1e-3
        if t["method"] == "della":
            assert 0.05 <= params["epsilon"] <= 0.3 and params["density"] == 0.5
        if t["method"] == "nuslerp":
            assert params["nuslerpFlatten"] in (True, False)


def test_scores_read_the_flat_status_metrics_of_kubernetes_and_bad_metrics_fail_the_trial():
    """On Kubernetes an Eval's status.metrics holds its termination message's flattened keys
    (benchmarks.<name>.pass1); the local runner's result file nests them. Both score the same; an Eval that
    reported no scores fails its trial (the reconcile must not raise: it would retry forever)."""
    search = Search.from_spec(spec(objective={"name": "worstRetainedGain"}), "s")
    trial = search.propose([])[0]
    nested = toy_metrics(trial)
    flat = {"score": 0.5, "questions": 10, **{f"benchmarks.{n}.{k}": v for n, b in nested["benchmarks"].items()
                                              for k, v in {**b, "n": 5}.items()}}
    flat_refs = {label: {f"benchmarks.{n}.pass1": b["pass1"] for n, b in m["benchmarks"].items()}
                 for label, m in REFS.items()}
    a, b = search.score(trial, nested, REFS), search.score(trial, flat, flat_refs)
    assert a["state"] == b["state"] == SUCCEEDED and a["objective"] == b["objective"] and a["scores"] == b["scores"]
    for bad in ({}, {"score": 0.4}, {"benchmarks": {"math-dev": {"pass1": "n/a"}}}):
        failed = search.score(trial, bad, REFS)
        assert failed["state"] == FAILED and failed["message"].startswith("objective: "), failed
