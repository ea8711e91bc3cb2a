"""MergeSearch's core: which merges to try, how to score them, who wins. Pure and torch-free.

Both control planes drive it the same way: ``Search.from_spec(spec)`` parses the search (plain wire dict),
``propose(trials)`` says which new trials to start now, ``merge_steps``/``eval_spec`` give each trial's Merge
and Eval specs, ``score``/``fail`` record what came back, ``summary`` gives the status (done/total, leaderboard,
winner). The recorded trials are the only state: a restarted operator (or a rerun ``branchmerge run``)
rebuilds everything from them and continues the same search.

Reproducibility: a trial's point depends only on the seed, its number and the recorded trials before it.
grid enumerates in order; random draws trial n from a generator seeded with (seed, n); tpe (Optuna, ask
mode) rebuilds an in-memory study from the trials numbered <= n - parallelism -- finished by construction,
since at most ``parallelism`` trials run at once -- so what it proposes never depends on timing.

Identity: a trial is the hash of its resolved Merge specs (a pairwise chain is several). The same spec is
the same child, so its result is reused; a proposal equal to an earlier trial is drawn again instead.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

from ..api import merge_methods as registry
from ..api.common import TERMINAL
from ..api.merge import METHODS, NEEDS_BASE

PAIRWISE = tuple(r.name for r in registry.ROWS if r.max_models == 2)
"""Methods that merge exactly two models: more branches are merged as a chain in a given order."""
GLOBAL_PARAMS = tuple(n for n in registry.PARAMS if n != "weight")
"""Search parameters that become ``spec.parameters.<name>`` of the Merge (for a per-model parameter: the
default of every model); ``weights`` become per-model."""


def _accepts(method: str) -> set[str]:
    """The parameters a method uses (the merge stage rejects the others): the method registry's row."""
    return set(registry.row(method).parameters)


SAMPLERS = ("grid", "random", "tpe")
OBJECTIVES = ("meanPass1", "worstRetainedGain")
PENDING, RUNNING, SUCCEEDED, FAILED = "Pending", "Running", "Succeeded", "Failed"
REDRAWS = 64  # draws per trial number before random/tpe call the space exhausted (every draw a duplicate)
TPE_DRAWS = 4  # TPE proposals per trial number before a duplicate-only TPE falls back to random draws
TPE_MEMO_SIZE = 4096  # remembered TPE proposals (a few hundred bytes each)
_TPE_MEMO: dict[tuple, dict | None] = {}
STEP_REF = "trialStep"  # placeholder model ref {"trialStep": k}: the output of step k of the same trial


def _within_bounds(choice: "Choice", param) -> "Choice":
    """SpaceError naming the field when a value or range end lies outside the Merge API's bounds for it."""
    ends = list(choice.values) if choice.values is not None else [choice.low, choice.high]
    for v in ends:
        if isinstance(v, bool) != (param.kind is bool) or not isinstance(v, (int, float)):
            raise SpaceError(choice.path, f"{v!r} is not a {param.kind.__name__}")
        if param.kind is bool:
            continue
        for op, bound, ok in (("above", param.gt, lambda x, b: x > b), ("at least", param.ge, lambda x, b: x >= b),
                              ("below", param.lt, lambda x, b: x < b), ("at most", param.le, lambda x, b: x <= b)):
            if bound is not None and not ok(v, bound):
                raise SpaceError(choice.path, f"{v} is out of range: {param.name} must be {op} {bound:g}")
    return choice


class SpaceError(ValueError):
    """A search spec that cannot run; ``path`` is the field (spec.space[1].parameters.density)."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class ObjectiveError(ValueError):
    """The objective cannot be computed from the Eval results (missing benchmark, branch without gain)."""


# ---- the space ----------------------------------------------------------------------------------------

def _round(x: float) -> float:
    return float(f"{x:.10g}")


@dataclass(frozen=True)
class Choice:
    """One searched parameter: a list of values, or a range [min, max] (with a step: a grid of values)."""

    name: str  # density, lambda, weight.<branch>, ...
    path: str
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @classmethod
    def parse(cls, name: str, doc: Any, path: str) -> "Choice":
        if not isinstance(doc, dict):
            return cls(name, path, values=(doc,))  # a bare value: fixed
        unknown = set(doc) - {"values", "min", "max", "step", "log"}
        if unknown:
            raise SpaceError(path, f"unknown keys {sorted(unknown)} (use values, or min/max[/step][/log])")
        if doc.get("log") is False:  # the stored default (CRD) says nothing
            doc = {k: v for k, v in doc.items() if k != "log"}
        if "values" in doc:
            if set(doc) != {"values"} or not isinstance(doc["values"], list) or not doc["values"]:
                raise SpaceError(path, "values must be a non-empty list, without min/max")
            if len({json.dumps(v) for v in doc["values"]}) != len(doc["values"]):
                raise SpaceError(f"{path}.values", "values repeat")
            return cls(name, path, values=tuple(doc["values"]))
        if "min" not in doc or "max" not in doc:
            raise SpaceError(path, "a range needs min and max (or give values)")
        low, high, step = float(doc["min"]), float(doc["max"]), doc.get("step")
        if not low < high:
            raise SpaceError(path, f"min ({low}) must be below max ({high})")
        if step is not None and not 0 < float(step) <= high - low:
            raise SpaceError(f"{path}.step", "step must be in (0, max - min]")
        if doc.get("log") and (low <= 0 or step is not None):
            raise SpaceError(f"{path}.log", "a log range needs min > 0 and no step")
        return cls(name, path, low=low, high=high, step=None if step is None else float(step),
                   log=bool(doc.get("log")))

    def grid(self) -> list:
        if self.values is not None:
            return list(self.values)
        if self.step is None:
            raise SpaceError(self.path, "the grid sampler needs values or a step for every range")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [_round(self.low + i * self.step) for i in range(count)]

    def sample(self, rng: random.Random):
        if self.values is not None or self.step is not None:
            return rng.choice(self.grid())
        if self.log:
            return _round(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return _round(rng.uniform(self.low, self.high))

    def suggest(self, trial, key: str):
        """The value from an Optuna trial (ask mode)."""
        if self.values is not None:
            index = trial.suggest_categorical(key, list(range(len(self.values))))
            return self.values[index]
        if self.step is not None:
            return _round(trial.suggest_float(key, self.low, self.high, step=self.step))
        return _round(trial.suggest_float(key, self.low, self.high, log=self.log))

    def optuna_value(self, value):
        """The recorded value as Optuna stores it (categoricals by index)."""
        return self.values.index(value) if self.values is not None else value

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        if self.values is not None:
            return CategoricalDistribution(list(range(len(self.values))))
        return FloatDistribution(self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class Candidate:
    """One entry of spec.space: a method, its searched parameters and, for pairwise methods, chain orders."""

    index: int
    method: str
    choices: tuple[Choice, ...]
    orders: tuple[tuple[str, ...], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.index}:{self.method}"

    def points(self) -> Iterable[tuple[dict, tuple[str, ...] | None]]:
        grids = [c.grid() for c in self.choices]
        for order in self.orders or (None,):
            for values in itertools.product(*grids):
                yield {c.name: v for c, v in zip(self.choices, values)}, order


@dataclass(frozen=True)
class Branch:
    name: str
    model: dict
    benchmark: str | None  # the dev benchmark of this branch's domain


def _ref_ok(doc: Any) -> bool:
    return isinstance(doc, dict) and (("uri" in doc) != ("from" in doc))


@dataclass
class Search:
    name: str
    branches: tuple[Branch, ...]
    base: dict | None
    candidates: tuple[Candidate, ...]
    max_trials: int
    parallelism: int
    sampler: str
    seed: int
    objective: str
    above_base: bool
    margin: float
    eval_template: dict
    merge_template: dict
    leaderboard_size: int = 5
    startup_trials: int = 4
    output_root: str | None = None  # spec.outputRoot: where the children write (else the control plane's default)
    fingerprint: str = ""  # of the spec: keys the TPE memo (a replay asks again what it asked before)

    # ---- parsing ------------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: dict, name: str = "search") -> "Search":
        """Parse a MergeSearch spec (wire form, camelCase); SpaceError names the field of a bad one."""
        branches = []
        for i, b in enumerate(spec.get("branches") or []):
            path = f"spec.branches[{i}]"
            if not isinstance(b, dict) or not b.get("name") or not _ref_ok(b.get("model")):
                raise SpaceError(path, "a branch needs a name and a model (exactly one of uri or from)")
            branches.append(Branch(b["name"], b["model"], b.get("benchmark")))
        if len(branches) < 2:
            raise SpaceError("spec.branches", "a search merges at least 2 branches")
        names = [b.name for b in branches]
        if len(set(names)) != len(names):
            raise SpaceError("spec.branches", "branch names must be unique")
        base = spec.get("base")
        if base is not None and not _ref_ok(base):
            raise SpaceError("spec.base", "exactly one of uri or from must be set")
        candidates = [cls._candidate(i, c, names, base) for i, c in enumerate(spec.get("space") or [])]
        if not candidates:
            raise SpaceError("spec.space", "the search space needs at least one method")
        budget = spec.get("budget") or {}
        sampler = spec.get("sampler") or {}
        objective = spec.get("objective") or {}
        constraints = objective.get("constraints") or {}
        evaluation = spec.get("eval") or {}
        search = cls(
            name=name, branches=tuple(branches), base=base, candidates=tuple(candidates),
            max_trials=int(budget.get("maxTrials", 8)), parallelism=int(budget.get("parallelism", 1)),
            sampler=sampler.get("name", "grid"), seed=int(sampler.get("seed", 0)),
            objective=objective.get("name", "meanPass1"), above_base=bool(constraints.get("aboveBase", False)),
            margin=float(constraints.get("margin", 0.0)), eval_template=evaluation,
            merge_template=spec.get("merge") or {}, leaderboard_size=int(spec.get("leaderboardSize", 5)),
            startup_trials=int(sampler.get("startupTrials", 4)), output_root=spec.get("outputRoot"))
        search.fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
        search._check()
        return search

    @staticmethod
    def _candidate(index: int, doc: dict, branches: list[str], base: dict | None) -> Candidate:
        path = f"spec.space[{index}]"
        method = doc.get("method")
        if method not in METHODS:
            raise SpaceError(f"{path}.method", f"unknown method {method!r} (one of {', '.join(METHODS)})")
        if method in NEEDS_BASE and base is None and method not in PAIRWISE:
            raise SpaceError(f"{path}.method", f"{method} needs spec.base")
        accepts = _accepts(method)
        choices = []
        for pname, value in (doc.get("parameters") or {}).items():
            ppath = f"{path}.parameters.{pname}"
            if pname not in GLOBAL_PARAMS:
                raise SpaceError(ppath, f"unknown parameter (searchable: {', '.join(GLOBAL_PARAMS)}, and weights)")
            if pname not in accepts:
                raise SpaceError(ppath, f"{method} does not use {pname} (it uses: "
                                        f"{', '.join(sorted(accepts)) or 'no parameters'})")
            choices.append(_within_bounds(Choice.parse(pname, value, ppath), registry.PARAMS[pname]))
        for bname, value in (doc.get("weights") or {}).items():
            wpath = f"{path}.weights.{bname}"
            if bname not in branches:
                raise SpaceError(wpath, f"no branch named {bname!r}")
            if "weight" not in accepts or method in PAIRWISE:  # a chain's steps take no per-branch weights
                raise SpaceError(wpath, f"{method} takes no weights here")
            choices.append(Choice.parse(f"weight.{bname}", value, wpath))
        orders: list[tuple[str, ...]] = []
        if method in PAIRWISE:
            given = doc.get("orders")
            for j, order in enumerate(given or []):
                if sorted(order) != sorted(branches):
                    raise SpaceError(f"{path}.orders[{j}]", f"an order lists every branch once ({', '.join(branches)})")
                orders.append(tuple(order))
            if not given:  # every order: the chain's result depends on it (TinyR1's ablation)
                orders = list(itertools.permutations(branches))
            if len(set(orders)) != len(orders):
                raise SpaceError(f"{path}.orders", "orders repeat")
        elif doc.get("orders"):
            raise SpaceError(f"{path}.orders", f"orders are for pairwise methods ({', '.join(PAIRWISE)}) only")
        for required in sorted(registry.row(method).required):
            if not any(c.name == required for c in choices):
                raise SpaceError(f"{path}.parameters.{required}", f"{method} needs {required} (values or a range)")
        return Candidate(index, method, tuple(choices), tuple(orders))

    def _check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise SpaceError("spec.sampler.name", f"one of {', '.join(SAMPLERS)}")
        if self.objective not in OBJECTIVES:
            raise SpaceError("spec.objective.name", f"one of {', '.join(OBJECTIVES)}")
        if not 1 <= self.max_trials <= 1000:
            raise SpaceError("spec.budget.maxTrials", "must be in [1, 1000]")
        if not 1 <= self.parallelism <= self.max_trials:
            raise SpaceError("spec.budget.parallelism", "must be in [1, maxTrials]")
        if (self.objective == "worstRetainedGain" or self.above_base) and self.base is None:
            raise SpaceError("spec.base", "worstRetainedGain and aboveBase compare with the base: set spec.base")
        benchmarks = [b.get("name") for b in self.eval_template.get("benchmarks") or []]
        if not benchmarks:
            raise SpaceError("spec.eval.benchmarks", "the search needs development benchmarks to score trials")
        if self.objective == "worstRetainedGain":
            for i, b in enumerate(self.branches):
                if b.benchmark not in benchmarks:
                    raise SpaceError(f"spec.branches[{i}].benchmark",
                                     f"worstRetainedGain needs each branch's benchmark among {benchmarks}")
        if self.sampler == "grid":
            for c in self.candidates:
                for choice in c.choices:
                    choice.grid()  # raises for continuous ranges

    # ---- trials -------------------------------------------------------------------------------------
    def merge_steps(self, candidate: int, params: dict, order: Iterable[str] | None) -> list[dict]:
        """The Merge specs of a trial; a pairwise chain refers to its previous step as {"trialStep": k}."""
        cand = self.candidates[candidate]
        by_name = {b.name: b for b in self.branches}
        # an integer parameter (maxIter) takes the nearest integer: the Merge API's field is an integer
        globals_ = {k: (int(round(v)) if registry.PARAMS[k].kind is int else v) for k, v in params.items()
                    if k in GLOBAL_PARAMS}
        common = json.loads(json.dumps(self.merge_template))
        if cand.method in PAIRWISE:
            order = list(order or [])
            steps, prev = [], by_name[order[0]].model
            for k, nxt in enumerate(order[1:]):
                spec = {**common, "method": cand.method, "models": [dict(prev), dict(by_name[nxt].model)]}
                if registry.row(cand.method).base == "required":  # TinyR1: the model merged in is the base
                    spec["base"] = dict(by_name[nxt].model)
                if globals_:
                    spec["parameters"] = dict(globals_)
                steps.append(spec)
                prev = {STEP_REF: k}
            return steps
        models = []
        for b in self.branches:
            model = dict(b.model)
            if f"weight.{b.name}" in params:
                model["weight"] = params[f"weight.{b.name}"]
            models.append(model)
        spec = {**common, "method": cand.method, "models": models}
        if self.base is not None and cand.method in NEEDS_BASE:
            spec["base"] = dict(self.base)
        if globals_:
            spec["parameters"] = dict(globals_)
        return [spec]

    def trial_id(self, candidate: int, params: dict, order: Iterable[str] | None) -> str:
        canonical = json.dumps(self.merge_steps(candidate, params, order), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def _trial(self, number: int, candidate: int, params: dict, order) -> dict:
        cand = self.candidates[candidate]
        trial = {"number": number, "id": self.trial_id(candidate, params, order), "candidate": candidate,
                 "method": cand.method, "params": params, "state": PENDING}
        if order is not None:
            trial["order"] = list(order)
        return trial

    def grid_size(self) -> int:
        return sum(len(list(c.points())) for c in self.candidates)

    def propose(self, trials: list[dict]) -> list[dict]:
        """New trials to start now: within the budget (maxTrials in all, parallelism at once) and, for tpe,
        only once the trials its proposal learns from have finished. Appending them is the caller's job."""
        trials = list(trials)
        new: list[dict] = []
        while len(trials) < self.max_trials:
            if sum(t["state"] not in TERMINAL for t in trials) >= self.parallelism:
                break
            trial = self._next(trials)
            if trial is None:
                break
            trials.append(trial)
            new.append(trial)
        return new

    def exhausted(self, trials: list[dict]) -> bool:
        """No further distinct trial exists (or none is found in REDRAWS draws)."""
        if self.sampler == "tpe" and not self._history_ready(trials):
            return False
        return len(trials) < self.max_trials and self._next(trials) is None

    def _next(self, trials: list[dict]) -> dict | None:
        seen = {t["id"] for t in trials}
        number = len(trials)
        if self.sampler == "grid":
            for cand in self.candidates:
                for params, order in cand.points():
                    if self.trial_id(cand.index, params, order) not in seen:
                        return self._trial(number, cand.index, params, order)
            return None
        if self.sampler == "tpe":
            if not self._history_ready(trials):
                return None
            found = self._tpe_memo(trials, seen)
            if found is not None:
                return found
            # TPE keeps proposing points already tried (it has converged on a discrete region): explore
            # with seeded random draws instead, so a budget is not cut short by a small optimum
        for draw in range(REDRAWS):
            rng = random.Random(f"{self.seed}/{number}/{draw}")
            cand = rng.choice(self.candidates)
            params = {c.name: c.sample(rng) for c in cand.choices}
            order = rng.choice(cand.orders) if cand.orders else None
            if self.trial_id(cand.index, params, order) not in seen:
                return self._trial(number, cand.index, params, order)
        return None

    # ---- tpe (Optuna, ask mode) -----------------------------------------------------------------------
    def _history(self, trials: list[dict]) -> list[dict]:
        return trials[:max(0, len(trials) - self.parallelism + 1)]

    def _history_ready(self, trials: list[dict]) -> bool:
        return all(t["state"] in TERMINAL for t in self._history(trials))

    def _tpe_memo(self, trials: list[dict], seen: set[str]) -> dict | None:
        """``_tpe``, remembered: its answer is a pure function of the spec and the recorded trials, and the
        drivers replay the whole search on every reconcile (an Optuna study per trial: quadratic without it)."""
        key = (self.fingerprint, tuple(sorted(seen)),
               tuple((t["id"], t["state"], t.get("objective"), tuple(t.get("violations", ())))
                     for t in self._history(trials)))
        if key not in _TPE_MEMO:
            if len(_TPE_MEMO) >= TPE_MEMO_SIZE:
                _TPE_MEMO.pop(next(iter(_TPE_MEMO)))
            _TPE_MEMO[key] = self._tpe(trials, seen)
        found = _TPE_MEMO[key]
        return None if found is None else json.loads(json.dumps(found))

    def _tpe(self, trials: list[dict], seen: set[str]) -> dict | None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        labels = [c.label for c in self.candidates]
        number = len(trials)
        for draw in range(TPE_DRAWS):
            seed = int.from_bytes(hashlib.sha256(f"{self.seed}/{number}/{draw}".encode()).digest()[:4], "big")
            with warnings.catch_warnings():  # multivariate/group/constraints are "experimental" in Optuna
                warnings.simplefilter("ignore")
                sampler = optuna.samplers.TPESampler(
                    seed=seed, n_startup_trials=self.startup_trials, multivariate=True, group=True,
                    constraints_func=_constraints if self.above_base else None)
                study = optuna.create_study(direction="maximize", sampler=sampler)
                for past in self._history(trials):
                    study.add_trial(self._frozen(past, labels))
                ask = study.ask()
                label = ask.suggest_categorical("candidate", labels)
                cand = self.candidates[labels.index(label)]
                params = {c.name: c.suggest(ask, f"{cand.index}:{c.name}") for c in cand.choices}
                order = None
                if cand.orders:
                    order = cand.orders[ask.suggest_categorical(f"{cand.index}:order", list(range(len(cand.orders))))]
            if self.trial_id(cand.index, params, order) not in seen:
                return self._trial(number, cand.index, params, order)
        return None

    def _frozen(self, trial: dict, labels: list[str]):
        """A recorded trial as an Optuna FrozenTrial (how a restarted search learns what it already saw)."""
        from optuna.distributions import CategoricalDistribution
        from optuna.trial import TrialState, create_trial

        cand = self.candidates[trial["candidate"]]
        params = {"candidate": cand.label}
        dists: dict = {"candidate": CategoricalDistribution(labels)}
        for c in cand.choices:
            key = f"{cand.index}:{c.name}"
            params[key], dists[key] = c.optuna_value(trial["params"][c.name]), c.distribution()
        if cand.orders:
            key = f"{cand.index}:order"
            params[key] = cand.orders.index(tuple(trial["order"]))
            dists[key] = CategoricalDistribution(list(range(len(cand.orders))))
        ok = trial["state"] == SUCCEEDED and trial.get("objective") is not None
        attrs = {"constraints": trial.get("violations", [-1.0])} if ok and self.above_base else {}
        return create_trial(state=TrialState.COMPLETE if ok else TrialState.FAIL,
                            value=trial["objective"] if ok else None, params=params, distributions=dists,
                            system_attrs=attrs)

    # ---- evaluation ---------------------------------------------------------------------------------
    def eval_spec(self, model: dict) -> dict:
        """The development Eval of a model (a trial's merge, the base or a branch)."""
        spec = json.loads(json.dumps(self.eval_template))
        spec["model"] = dict(model)
        return spec

    def references(self) -> dict[str, dict]:
        """Models the objective compares with, each evaluated once on the dev split: label -> model ref."""
        if self.objective != "worstRetainedGain" and not self.above_base:
            return {}
        refs = {"base": dict(self.base)}  # type: ignore[arg-type]
        if self.objective == "worstRetainedGain":
            refs.update({f"branch-{b.name}": dict(b.model) for b in self.branches})
        return refs

    def score(self, trial: dict, metrics: dict, references: dict[str, dict] | None = None) -> dict:
        """Record a finished trial's Eval metrics ({benchmarks: {name: {pass1}}}); ``references``: label ->
        metrics of ``references()``. Sets objective, feasibility and per-benchmark scores."""
        references = references or {}
        try:  # an Eval without scores fails its trial; the search goes on (and the reconcile never raises)
            scores = _pass1(metrics, "trial")
            out = {**trial, "state": SUCCEEDED, "scores": scores}
            out.pop("message", None)
            if self.objective == "meanPass1":
                out["objective"] = _round(sum(scores.values()) / len(scores))
            else:
                base = _pass1(references["base"], "base")
                gains = {}
                for b in self.branches:
                    branch = _pass1(references[f"branch-{b.name}"], f"branch {b.name}")
                    gain = branch[b.benchmark] - base[b.benchmark]
                    if gain <= 0:
                        raise ObjectiveError(f"branch {b.name} does not beat the base on {b.benchmark} "
                                             f"({branch[b.benchmark]:.4f} vs {base[b.benchmark]:.4f}): its "
                                             f"retained gain is undefined")
                    gains[b.name] = _round((scores[b.benchmark] - base[b.benchmark]) / gain)
                out["retainedGain"] = gains
                out["objective"] = min(gains.values())
            if self.above_base:
                base = _pass1(references["base"], "base")
                # Optuna's convention: a value > 0 violates (here: how far below base + margin)
                # rounded: float noise (0.1 + 0.2) must not decide "above" (pass@1 resolution is far coarser)
                out["violations"] = [round(base[n] + self.margin - scores[n], 9) for n in sorted(scores)]
                out["feasible"] = all(v < 0 for v in out["violations"])
            else:
                out["feasible"] = True
        except (KeyError, TypeError, ValueError) as err:  # ObjectiveError is a ValueError
            return self.fail(trial, f"objective: {err}")
        return out

    def fail(self, trial: dict, message: str) -> dict:
        """A trial that failed (its Merge, its Eval, or its objective): recorded, and the search goes on."""
        out = {k: v for k, v in trial.items() if k not in ("objective", "feasible", "violations")}
        return {**out, "state": FAILED, "message": message[:500]}

    # ---- results ------------------------------------------------------------------------------------
    def leaderboard(self, trials: list[dict]) -> list[dict]:
        """The best succeeded trials, feasible first, by objective (ties: the earlier trial)."""
        done = [t for t in trials if t["state"] == SUCCEEDED and t.get("objective") is not None]
        done.sort(key=lambda t: (not t.get("feasible", True), -t["objective"], t["number"]))
        keys = ("number", "id", "method", "params", "order", "objective", "feasible", "scores", "retainedGain")
        return [{"rank": i + 1, **{k: t[k] for k in keys if k in t}}
                for i, t in enumerate(done[:self.leaderboard_size])]

    def winner(self, trials: list[dict]) -> dict | None:
        board = self.leaderboard(trials)
        return board[0] if board and board[0].get("feasible", True) else None

    def complete(self, trials: list[dict]) -> bool:
        """Every trial of the budget (or of the space) has finished."""
        if any(t["state"] not in TERMINAL for t in trials):
            return False
        return len(trials) >= self.max_trials or self.exhausted(trials)

    def summary(self, trials: list[dict]) -> dict:
        """The status view: trials done/total, failed count, leaderboard, winner."""
        total = self.max_trials if self.sampler != "grid" else min(self.max_trials, self.grid_size())
        return {"trialsDone": sum(t["state"] in TERMINAL for t in trials), "trialsTotal": total,
                "trialsFailed": sum(t["state"] == FAILED for t in trials),
                "leaderboard": self.leaderboard(trials), "winner": self.winner(trials)}


def _constraints(frozen) -> list[float]:
    # Optuna counts a value <= 0 as satisfied; "above the base" is strict, so a tie must violate.
    return [v + 1e-9 for v in frozen.system_attrs.get("constraints", [-1.0])]


def _pass1(metrics: dict, what: str) -> dict[str, float]:
    """pass@1 per benchmark from an Eval's metrics: nested (the local runner's result file) or as the flat
    ``benchmarks.<name>.pass1`` keys of status.metrics on Kubernetes (the pod's termination message)."""
    metrics = metrics or {}
    benchmarks = metrics.get("benchmarks")
    if isinstance(benchmarks, dict) and benchmarks:
        return {name: float(b["pass1"]) for name, b in benchmarks.items()}
    flat = {key[len("benchmarks."):-len(".pass1")]: float(value) for key, value in metrics.items()
            if key.startswith("benchmarks.") and key.endswith(".pass1") and isinstance(value, (int, float))}
    if not flat:
        raise ObjectiveError(f"the {what} Eval reported no benchmarks")
    return flat
