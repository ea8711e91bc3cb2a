"""The merge-method registry: one row per method, the single source of what each method accepts.

Torch-free (the API and the operator import it). Generated from it, never kept by hand elsewhere:

- ``api.merge``: the ``Method`` literal, the bounds of every parameter field and the CEL rules (base
  required / forbidden / one of the models, number of models, required parameters, parameters a method
  does not use);
- ``trainer.merge.params``: the stage's checks (the same rules, field path first) and the defaults it
  fills in for unset parameters (none is a CRD default: see ``api.merge.MergeParameters``);
- the "Merge methods" section of docs/api-reference.md (``reference_section``).

Adding a method is one row and one module:

1. Append a ``MethodRow`` to ``ROWS`` (name, anchor paper, the wire names of the parameters it uses,
   number of models, base policy, seeded or not, per-method defaults). A parameter new to the project is
   also a ``Param`` in ``PARAMS`` and a field of ``MergeParameters`` (global) or ``MergeInput`` (per
   model) in ``api.merge`` -- the field takes its bounds and description from here -- and a field of
   ``TensorParams`` that ``trainer.merge.params.ParamResolver`` fills.
2. Add ``trainer/merge/methods/<name>.py`` (``NAME``, ``ANCHOR``, ``ACCEPTS`` = the wire names the code
   reads, ``merge_blocks``, ``merge``) and list it in ``trainer.merge.methods.METHODS``.
3. Regenerate: ``branchmerge crds --out crds --docs docs/api-reference.md`` and
   ``.venv/bin/python charts/branchmerge/scripts/sync_crds.py``. tests/api/test_merge_registry.py
   fails until the module's ACCEPTS equals the row and the API's list equals the engine's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Scope = Literal["model", "global"]
BasePolicy = Literal["required", "optional", "forbidden"]


@dataclass(frozen=True)
class Param:
    """One parameter on the wire (camelCase, mergekit 0.1.5's name). ``scope`` "model": set per model
    (``spec.models[i].<name>``) with ``spec.parameters.<name>`` as the default for models that set none;
    "global": ``spec.parameters.<name>`` only."""

    name: str
    kind: type
    scope: Scope
    doc: str
    default: object = None  # what the stage uses when unset (a row's ``defaults`` may change it); None: no default
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    override: bool = False  # also settable per tensor in spec.parameters.overrides[]

    def bounds(self) -> str:
        parts = [f"{op} {v:g}" for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                 if v is not None]
        return ", ".join(parts)


PARAMS: dict[str, Param] = {p.name: p for p in (
    Param("weight", float, "model", "Relative weight of the model; 1.0 when unset.", 1.0, gt=0),
    Param("density", float, "model", "Fraction of the model's task vector kept (by magnitude, at random, or "
          "by magnitude rank, per method).", None, gt=0, le=1, override=True),
    Param("gamma", float, "model", "breadcrumbs*: fraction of the largest-magnitude task-vector entries "
          "dropped as outliers (before the smallest are dropped down to the density); 0.01 when unset.",
          0.01, ge=0, lt=1),
    Param("epsilon", float, "model", "della*: keep probabilities range over density +/- epsilon by magnitude "
          "rank within each row (density - epsilon > 0 and density + epsilon < 1); 0.15 when unset.",
          0.15, ge=0, lt=0.5),
    Param("normalize", bool, "global", "Divide the merged task vector (or sum) by the sum of the weights of "
          "what was kept.", True),
    Param("lambda", float, "global", "Scale of the merged task vector; 1.0 when unset.", 1.0, ge=0, le=100,
          override=True),
    Param("rescale", bool, "global", "Rescale each sparsified task vector so its L1 norm is preserved.", True),
    Param("t", float, "global", "slerp: 0 gives the first model (or the base), 1 the other; nearswap: the "
          "similarity threshold (the other model's value is taken where |difference| <= t; elsewhere the base "
          "moves t towards it, a share t / |difference| of the way).", None,
          ge=0, le=1, override=True),
    Param("selectTopk", float, "global", "sce: fraction of entries kept, those with the largest variance "
          "across the task vectors; 1.0 when unset.", 1.0, gt=0, le=1),
    Param("nuslerpFlatten", bool, "global", "nuslerp: interpolate the flattened tensors (false: per row or "
          "column); true when unset.", True),
    Param("nuslerpRowWise", bool, "global", "nuslerp: with nuslerpFlatten false, interpolate the vectors along "
          "the first dimension (the columns W[:, j], mergekit's naming) instead of the last (the rows W[i, :]); "
          "false when unset.", False),
    Param("normalizeWeights", bool, "global", "multislerp: divide the weights by their sum; true when unset.",
          True),
    Param("eps", float, "global", "multislerp: numerical floor of norms; 1e-8 when unset.", 1e-8, gt=0, le=0.1),
    Param("maxIter", int, "global", "karcher: most iterations of the Karcher mean; 10 when unset.", 10,
          ge=1, le=1000),
    Param("tol", float, "global", "karcher: stop when the update's norm is below this; 1e-5 when unset.", 1e-5,
          gt=0, le=1),
)}
# A spec written by an older CRD that defaulted these (or by a tool that writes every field) carries them
# for every method: the value that changes nothing is accepted where a method does not use the parameter.
NEUTRAL = {"weight": 1.0, "normalize": True, "lambda": 1.0, "rescale": True}
# Per-tensor overrides that depend on a parameter: weightScale multiplies the weights.
OVERRIDE_NEEDS = {"t": "t", "density": "density", "lambda": "lambda", "weightScale": "weight"}


@dataclass(frozen=True)
class MethodRow:
    name: str
    paper: str
    arxiv: str | None  # None: no arXiv paper (the reference is named in ``paper``)
    parameters: frozenset[str]
    min_models: int = 1  # entries of spec.models (the base counts when it is one of them)
    max_models: int | None = None
    base: BasePolicy = "required"
    base_in_models: bool = False  # the base, when set, must be one of spec.models
    seeded: bool = False  # draws random numbers (from spec.seed)
    required: frozenset[str] = frozenset()  # parameters with no default that must be set
    defaults: dict = field(default_factory=dict)  # this method's defaults where they differ from PARAMS'
    summary: str = ""

    def default(self, name: str):
        return self.defaults.get(name, PARAMS[name].default)


def _row(name, paper, arxiv, parameters, **kw) -> MethodRow:
    params = frozenset(parameters.split())
    unknown = params - PARAMS.keys()
    assert not unknown, f"{name}: unknown parameters {sorted(unknown)}"
    return MethodRow(name, paper, arxiv, params, **kw)


_DENSITY = frozenset({"density"})
_DARE = "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch"
_BREADCRUMBS = "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks"
_DELLA = "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling"
ROWS: list[MethodRow] = [
    _row("linear", "Model soups: averaging weights of multiple fine-tuned models improves accuracy without "
         "increasing inference time", "2203.05482", "weight normalize", base="optional",
         summary="Weighted average of the models (the base, if set, only supplies config and tokenizer)."),
    _row("task_arithmetic", "Editing Models with Task Arithmetic", "2212.04089", "weight normalize lambda",
         defaults={"normalize": False},
         summary="base + lambda * sum of the weighted task vectors."),
    _row("ties", "TIES-Merging: Resolving Interference When Merging Models", "2306.01708",
         "weight density normalize lambda rescale", required=_DENSITY, defaults={"rescale": False},
         summary="Task vectors trimmed to their largest magnitudes, sign election, mean of the agreeing ones."),
    _row("dare_ties", _DARE, "2311.03099", "weight density normalize lambda rescale", seeded=True,
         required=_DENSITY, defaults={"normalize": False},
         summary="Task vectors dropped at random (rescaled), then TIES sign election."),
    _row("dare_linear", _DARE, "2311.03099", "weight density normalize lambda rescale", seeded=True,
         required=_DENSITY, defaults={"normalize": False},
         summary="Task vectors dropped at random (rescaled), then a weighted sum."),
    _row("slerp", "Animating rotation with quaternion curves (Shoemake, SIGGRAPH 1985)", None, "t",
         min_models=2, max_models=2, base="optional", base_in_models=True, required=frozenset({"t"}),
         summary="Spherical interpolation between two models."),
    _row("model_stock", "Model Stock: All we need is just a few fine-tuned models", "2403.19522", "",
         min_models=2, summary="Interpolation towards the models' mean by the angle between their task vectors."),
    _row("arcee_fusion", "TinyR1-32B-Preview: Boosting Accuracy with Branch-Merge Distillation", "2503.04872",
         "", min_models=2, max_models=2, base_in_models=True, seeded=True,
         summary="The other model's value where its importance score passes a threshold, the base's elsewhere."),
    _row("breadcrumbs", _BREADCRUMBS, "2312.06795", "weight density gamma normalize lambda rescale",
         required=_DENSITY, defaults={"normalize": False, "rescale": False},
         summary="Task vectors without their largest (gamma) and smallest entries (down to density), summed."),
    _row("breadcrumbs_ties", _BREADCRUMBS, "2312.06795", "weight density gamma normalize lambda rescale",
         required=_DENSITY, defaults={"normalize": False, "rescale": False},
         summary="Breadcrumbs' sparsification, then TIES sign election."),
    _row("della", _DELLA, "2406.11617", "weight density epsilon normalize lambda rescale", seeded=True,
         required=_DENSITY,
         summary="Task vectors dropped at random, larger magnitudes (by rank in their row) kept more often, "
                 "rescaled, then TIES sign election."),
    _row("della_linear", _DELLA, "2406.11617", "weight density epsilon normalize lambda rescale", seeded=True,
         required=_DENSITY, defaults={"normalize": False},
         summary="DELLA's drop (rescaled), then a weighted sum."),
    _row("sce", "FuseChat: Knowledge Fusion of Chat Models", "2408.07990", "selectTopk",
         summary="Entries of high variance across the task vectors selected, models weighted by their task "
                 "vectors' mean square, sign conflicts erased."),
    _row("nuslerp", "Arcee's MergeKit: A Toolkit for Merging Large Language Models (its normalized, weighted "
         "SLERP)", "2403.13257", "weight nuslerpFlatten nuslerpRowWise", min_models=2, max_models=2,
         base="optional", summary="Spherical interpolation of two models at t = w1 / (w0 + w1), of their task "
         "vectors when a base is set; on the flattened tensors, or per vector along dim 0 (nuslerpRowWise) or "
         "along the last dim."),
    _row("multislerp", "Multi-SLERP (C. Goddard, goddard.blog/posts/multislerp-wow-what-a-cool-idea)", None,
         "weight normalizeWeights eps", base="optional",
         summary="Weighted barycentre of any number of models (or task vectors, with a base) on the hypersphere, "
         "through the tangent space at their normalized weighted mean, scaled by the weighted mean norm."),
    _row("karcher", "Riemannian center of mass and mollifier smoothing (H. Karcher, 1977)", None, "maxIter tol",
         min_models=2, base="optional",
         summary="Karcher mean of the models' directions on the hypersphere (the base, when set, is one more "
         "input), scaled by their mean norm."),
    _row("nearswap", "NearSwap (alchemonaut, huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)", None, "t",
         min_models=2, max_models=2, base_in_models=True, required=frozenset({"t"}),
         summary="The other model's value where it is within t of the base's; farther, a share t / |difference| "
         "of the way from the base."),
]
BY_NAME: dict[str, MethodRow] = {r.name: r for r in ROWS}


def names() -> tuple[str, ...]:
    return tuple(r.name for r in ROWS)


def row(name: str) -> MethodRow:
    return BY_NAME[name]


def accepting(param: str) -> list[str]:
    """The methods that use ``param`` (a wire name, or an override's: weightScale follows weight)."""
    needed = OVERRIDE_NEEDS.get(param, param)
    return [r.name for r in ROWS if needed in r.parameters]


def count_phrase(r: MethodRow) -> str | None:
    """'exactly 2 models', 'at least 2 models', 'between 2 and 4 models'; None: any number."""
    lo, hi = r.min_models, r.max_models
    if lo == hi:
        return f"exactly {lo} models"
    if hi is None:
        return f"at least {lo} models" if lo > 1 else None
    return f"between {lo} and {hi} models"


def reference_section() -> str:
    """The "Merge methods" section of the API reference."""
    out = ["## Merge methods", "",
           "Generated from `branchmerge.api.merge_methods`. Parameters are set per model (`spec.models[i]`, "
           "with `spec.parameters` as the default for models that set none) or globally (`spec.parameters`); "
           "overrides (`spec.parameters.overrides[]`) may set t, density, lambda and weightScale per tensor "
           "where the method uses them. Unset parameters take the default shown.", "",
           "| method | paper | parameters (default) | models | base | random |", "|---|---|---|---|---|---|"]
    for r in ROWS:
        paper = f"{r.paper} ([arXiv:{r.arxiv}](https://arxiv.org/abs/{r.arxiv}))" if r.arxiv else r.paper
        params = []
        for name in sorted(r.parameters, key=lambda n: (PARAMS[n].scope != "model", n)):
            value = r.default(name)
            shown = "required" if name in r.required else ("none" if value is None else
                                                           str(value).lower() if isinstance(value, bool) else f"{value:g}")
            params.append(f"`{name}`{' (per model)' if PARAMS[name].scope == 'model' else ''}: {shown}")
        base = r.base + (", one of the models" if r.base_in_models else "")
        out.append(f"| `{r.name}` | {paper}. {r.summary} | {'; '.join(params) or '-'} | "
                   f"{count_phrase(r) or 'any number'} | {base} | {'seeded' if r.seeded else 'no'} |")
    out += ["", "| parameter | scope | bounds | description |", "|---|---|---|---|"]
    for p in PARAMS.values():
        doc = p.doc.replace("|", "\\|")
        out.append(f"| `{p.name}` | {'per model' if p.scope == 'model' else 'global'} | {p.bounds() or '-'} | "
                   f"{doc} Methods: {', '.join(accepting(p.name)) or '-'}. |")
    return "\n".join(out) + "\n"
