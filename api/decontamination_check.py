"""Which training data reaches a benchmark without a decontamination gate (``branchmerge validate`` warns).

A model scored on a benchmark (an Eval, or a MergeSearch on its development split) was trained on the data of
every BranchSFT upstream of it. Each such dataset must be gated against each of those benchmark datasets: the
BranchSFT lists the benchmark in its ``spec.decontaminate.benchmarks``, or the dataset is the output of a
TeacherGen that lists it. Benchmarks are compared by reference: the URI, or Kind/name for ``from:``.
Evals of models not produced in the manifest set are not checked (no training data of the set reaches them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .graph import Dag, ref_key


def gated(resource) -> set[str]:
    """The benchmark datasets a TeacherGen or BranchSFT declares its gate against."""
    gate = getattr(resource.spec, "decontaminate", None)
    return {ref_key(ref) for ref in gate.benchmarks} if gate is not None else set()


def scored_benchmarks(resource) -> list[tuple[str, str]]:
    """(benchmark name, dataset key) of an Eval or a MergeSearch's development split."""
    if resource.kind == "Eval":
        benchmarks = resource.spec.benchmarks
    elif resource.kind == "MergeSearch":
        benchmarks = resource.spec.eval.benchmarks
    else:
        return []
    return [(b.name, ref_key(b.dataset)) for b in benchmarks or []]  # a re-grading Eval (regrade) has none


@dataclass
class Ungated:
    """One training dataset that reaches benchmarks without a gate."""

    training: str  # BranchSFT/name
    path: str  # spec.data[i]
    dataset: str  # its key (URI or TeacherGen/name)
    benchmarks: dict[str, set[str]] = field(default_factory=dict)  # dataset key -> scoring CRs (Kind/name)

    def message(self) -> str:
        scorers = sorted({s for found in self.benchmarks.values() for s in found})
        shown = ", ".join(scorers[:3]) + (f" and {len(scorers) - 3} more" if len(scorers) > 3 else "")
        where = f"{self.training}'s spec.decontaminate.benchmarks"
        if self.dataset.startswith("TeacherGen/"):
            where += f" (or {self.dataset}'s)"
        return (f"{self.training} {self.path} ({self.dataset}) is not decontaminated against "
                f"{', '.join(sorted(self.benchmarks))}, scored by {shown}: list them in {where}")


def ungated(resources) -> list[Ungated]:
    """Every (training dataset, benchmark) pair without a gate between them, grouped by training dataset."""
    resources = list(resources)
    dag = Dag.build(resources)
    by_key = dag.resources
    found: dict[tuple[str, int], Ungated] = {}
    for scorer in resources:
        benchmarks = scored_benchmarks(scorer)
        if not benchmarks:
            continue
        for up in sorted(dag.ancestors(scorer.key)):
            training = by_key.get(up)
            if training is None or training.kind != "BranchSFT":
                continue
            own = gated(training)
            for i, item in enumerate(training.spec.data):
                key = ref_key(item)
                source = by_key.get(key) if item.from_ is not None else None
                cover = own | (gated(source) if source is not None else set())
                for _, bench in benchmarks:
                    if bench not in cover:
                        entry = found.setdefault((up, i), Ungated(up, f"spec.data[{i}]", key))
                        entry.benchmarks.setdefault(bench, set()).add(scorer.key)
    return [found[k] for k in sorted(found)]
