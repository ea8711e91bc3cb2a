"""MergeSearch: try merges of the same branches (methods, parameters, chain orders), score each with an Eval on
a development split, publish the best. Each trial is a Merge plus an Eval, run as child CRs (operator) or
stages (local runner); the search's logic is branchmerge.operator.search."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from . import merge_methods as registry
from .base import ApiModel, Rule
from .common import Engine, ModelRef, Resources, RunPolicy, Sampling, Uri
from .eval import Benchmark
from .merge import NEEDS_BASE, Dtype, Method

BranchName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=32)]
PAIRWISE = tuple(r.name for r in registry.ROWS if r.max_models == 2)
# Which methods use each searched parameter (the merge stage rejects the others); weights are per branch,
# which a pairwise chain's steps do not have.
# Every registry parameter but the per-branch weight is searchable as a Merge spec.parameters value (for a
# per-model parameter such as density: the default of every model).
SEARCHED = tuple(n for n in registry.PARAMS if n != "weight")
RANGES = tuple(n for n in SEARCHED if registry.PARAMS[n].kind is not bool)
USES = {p: tuple(registry.accepting(p)) for p in SEARCHED}
USES["weight"] = tuple(m for m in registry.accepting("weight") if m not in PAIRWISE)


def _in(methods) -> str:
    return "['" + "', '".join(methods) + "']"


class Range(ApiModel):
    """Values of a numeric parameter: a list, or [min, max] (with step: a grid; log: sampled on a log scale)."""

    rules = (
        Rule("has(self.values) != (has(self.min) && has(self.max))", "give values, or min and max"),
        Rule("!has(self.values) || (!has(self.min) && !has(self.max) && !has(self.step) && !self.log)",
             "values excludes min, max, step and log"),
        Rule("!has(self.min) || !has(self.max) || self.min < self.max", "min must be below max", ".min"),
        Rule("!has(self.step) || (has(self.min) && has(self.max) && self.step <= self.max - self.min)",
             "step needs min and max and must not exceed max - min", ".step"),
        Rule("!self.log || (has(self.min) && self.min > 0 && !has(self.step))", "a log range needs min > 0 and no step",
             ".log"),
    )
    values: Annotated[list[float], Field(min_length=1, max_length=64)] | None = None
    min: float | None = None
    max: float | None = None
    step: Annotated[float, Field(gt=0)] | None = None
    log: bool = False


class Flag(ApiModel):
    """Values of a boolean parameter."""

    values: Annotated[list[bool], Field(min_length=1, max_length=2)]


class SearchParameters(ApiModel):
    """Searched values of Merge ``spec.parameters`` fields (each only for the methods that use it; integer
    parameters take the nearest integer of a sampled value; bounds as in Merge)."""

    density: Range | None = None
    gamma: Range | None = None
    epsilon: Range | None = None
    lambda_: Range | None = Field(default=None, alias="lambda")
    t: Range | None = None
    select_topk: Range | None = None
    eps: Range | None = None
    max_iter: Range | None = None
    tol: Range | None = None
    normalize: Flag | None = None
    rescale: Flag | None = None
    nuslerp_flatten: Flag | None = None
    nuslerp_row_wise: Flag | None = None
    normalize_weights: Flag | None = None


def _uses(field: str, wire: str) -> Rule:
    return Rule(f"!has(self.parameters.{wire}) || self.method in {_in(USES[wire])}",
                f"{wire} is used by {', '.join(USES[wire])} only", f".parameters.{wire}")


class Candidate(ApiModel):
    """One method of the search space, with its parameter values."""

    rules = (
        *(_uses(f, f) for f in SEARCHED if USES[f]),
        Rule(f"size(self.weights) == 0 || self.method in {_in(USES['weight'])}",
             f"weights are used by {', '.join(USES['weight'])} only", ".weights"),
        *(Rule(f"self.method != '{r.name}' || has(self.parameters.{p})", f"{r.name} needs parameters.{p}",
               f".parameters.{p}", "FieldValueRequired") for r in registry.ROWS for p in sorted(r.required)),
        Rule(f"size(self.orders) == 0 || self.method in {_in(PAIRWISE)}",
             f"orders are for the pairwise methods ({', '.join(PAIRWISE)})", ".orders"),
    )
    method: Method
    parameters: SearchParameters = Field(default_factory=SearchParameters)
    weights: Annotated[dict[BranchName, Range], Field(max_length=16)] = Field(default_factory=dict)
    """Per-branch weight values (spec.models[i].weight of the Merge), by branch name."""
    orders: Annotated[list[Annotated[list[BranchName], Field(min_length=2, max_length=16)]],
                      Field(max_length=64)] = Field(default_factory=list)
    """Pairwise methods: chain orders to try ([math, science, code] merges math with science, then the
    result with code; arcee_fusion takes the model merged in as the base of each step). Empty: every order."""


class SearchBranch(ApiModel):
    name: BranchName
    """Short name used by weights, orders and the leaderboard."""
    model: ModelRef
    benchmark: Annotated[str, Field(max_length=63)] | None = None
    """The development benchmark of this branch's domain (needed by worstRetainedGain)."""


class Budget(ApiModel):
    max_trials: Annotated[int, Field(ge=1, le=1000)] = 8
    """Trials in all (a grid smaller than this ends earlier)."""
    parallelism: Annotated[int, Field(ge=1, le=64)] = 1
    """Trials running at once."""


class Sampler(ApiModel):
    name: Literal["grid", "random", "tpe"] = "grid"
    """grid: every point in order; random: seeded draws; tpe: Optuna's TPE, seeded, learning from the results."""
    seed: int = 0
    startup_trials: Annotated[int, Field(ge=1, le=1000)] = 4
    """tpe: random trials before the model takes over."""


class Constraints(ApiModel):
    above_base: bool = False
    """Only trials above the base on every development benchmark (by more than margin) may win."""
    margin: Annotated[float, Field(ge=0, le=1)] = 0.0


class SearchObjective(ApiModel):
    name: Literal["meanPass1", "worstRetainedGain"] = "meanPass1"
    """meanPass1: mean pass@1 over the development benchmarks; worstRetainedGain: the smallest
    (merged - base) / (branch - base) over the branches, each on its own benchmark."""
    constraints: Constraints = Field(default_factory=Constraints)


class DevEval(ApiModel):
    """The Eval of every trial (and of the base and branches when the objective compares with them): use a
    development split, never the data of the final Evals."""

    rules = (Rule("self.benchmarks.all(b, self.benchmarks.exists_one(c, c.name == b.name))",
                  "benchmark names must be unique", ".benchmarks"),)
    benchmarks: Annotated[list[Benchmark], Field(min_length=1, max_length=64)]
    engine: Engine = Field(default_factory=Engine)
    sampling: Sampling = Field(default_factory=Sampling)
    code_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 10
    resources: Resources = Field(default_factory=Resources)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)


class MergeSettings(ApiModel):
    """Settings of every trial's Merge besides method and parameters."""

    dtype: Dtype = "float32"
    out_dtype: Dtype | None = None
    seed: int = 0
    resources: Resources = Field(default_factory=Resources)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)


_NEEDS_BASE = [m for m in NEEDS_BASE if m not in PAIRWISE]


class MergeSearchSpec(ApiModel):
    """Search merge methods, parameters and orders; the winner is the output."""

    rules = (
        Rule("self.branches.all(b, self.branches.exists_one(c, c.name == b.name))", "branch names must be unique",
             ".branches"),
        Rule(f"!self.space.exists(s, s.method in {_in(_NEEDS_BASE)}) || has(self.base)",
             f"{', '.join(_NEEDS_BASE)} need a base", ".base", "FieldValueRequired"),
        Rule("self.space.all(s, s.orders.all(o, size(o) == size(self.branches) && "
             "self.branches.all(b, b.name in o)))", "an order lists every branch once", ".space"),
        Rule("self.space.all(s, s.weights.all(k, self.branches.exists(b, b.name == k)))",
             "weights name branches", ".space"),
        Rule("self.budget.parallelism <= self.budget.maxTrials", "parallelism must not exceed maxTrials",
             ".budget.parallelism"),
        Rule("(self.objective.name != 'worstRetainedGain' && !self.objective.constraints.aboveBase) || has(self.base)",
             "worstRetainedGain and aboveBase compare with the base", ".base", "FieldValueRequired"),
        Rule("self.objective.name != 'worstRetainedGain' || self.branches.all(b, has(b.benchmark) && "
             "self.eval.benchmarks.exists(e, e.name == b.benchmark))",
             "worstRetainedGain needs each branch's benchmark among eval.benchmarks", ".branches"),
        Rule("self.sampler.name != 'grid' || self.space.all(s, "
             + "".join(f"(!has(s.parameters.{n}) || has(s.parameters.{n}.values) || has(s.parameters.{n}.step)) && "
                       for n in RANGES)
             + "s.weights.all(k, has(s.weights[k].values) || has(s.weights[k].step)))",
             "the grid sampler needs values or a step for every range", ".space"),
    )
    branches: Annotated[list[SearchBranch], Field(min_length=2, max_length=16)]
    base: ModelRef | None = None
    """The backbone task vectors are taken against (and the reference of worstRetainedGain and aboveBase)."""
    space: Annotated[list[Candidate], Field(min_length=1, max_length=32)]
    budget: Budget = Field(default_factory=Budget)
    sampler: Sampler = Field(default_factory=Sampler)
    objective: SearchObjective = Field(default_factory=SearchObjective)
    eval: DevEval
    merge: MergeSettings = Field(default_factory=MergeSettings)
    leaderboard_size: Annotated[int, Field(ge=1, le=50)] = 5
    """Trials listed in status.metrics.leaderboard."""
    output_root: Uri | None = None
    """Where the trials write: <outputRoot>/merge/<child> and <outputRoot>/eval/<child>. When absent the control
    plane chooses (local: the workdir; Kubernetes: the operator's --default-output-root)."""
