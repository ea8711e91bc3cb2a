"""The dependency graph of a set of CRs, built from their ``from:`` references.

Used by ``branchmerge validate`` (dangling refs, cycles), the local runner (execution order) and the
operator (which upstreams a CR waits for).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .common import DatasetRef, ModelRef
from .resources import CustomResource
from .base import walk


@dataclass(frozen=True)
class Reference:
    """A ``from:`` reference found at ``path`` in the spec of a CR."""

    path: str
    kind: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"


def references(resource: CustomResource) -> list[Reference]:
    """Every ``from:`` reference in the resource's spec, with its field path."""
    refs = []
    for path, obj in walk(resource.spec, "spec"):  # type: ignore[attr-defined]
        if isinstance(obj, (ModelRef, DatasetRef)) and obj.from_ is not None:
            refs.append(Reference(f"{path}.from", obj.from_.kind, obj.from_.name))
    return refs


class CycleError(ValueError):
    def __init__(self, cycle: list[str]):
        self.cycle = cycle
        super().__init__("dependency cycle: " + " -> ".join(cycle))


@dataclass
class Dag:
    resources: dict[str, CustomResource]
    upstreams: dict[str, list[str]] = field(default_factory=dict)
    dangling: list[tuple[str, Reference]] = field(default_factory=list)

    @classmethod
    def build(cls, resources: Iterable[CustomResource]) -> "Dag":
        dag = cls({r.key: r for r in resources})
        for key, resource in dag.resources.items():
            ups = []
            for ref in references(resource):
                if ref.key not in dag.resources:
                    dag.dangling.append((key, ref))
                elif ref.key not in ups:
                    ups.append(ref.key)
            dag.upstreams[key] = ups
        return dag

    def downstreams(self, key: str) -> list[str]:
        return [k for k, ups in self.upstreams.items() if key in ups]

    def descendants(self, key: str) -> set[str]:
        seen: set[str] = set()
        stack = [key]
        while stack:
            for down in self.downstreams(stack.pop()):
                if down not in seen:
                    seen.add(down)
                    stack.append(down)
        return seen

    def ancestors(self, key: str) -> set[str]:
        seen: set[str] = set()
        stack = [key]
        while stack:
            for up in self.upstreams.get(stack.pop(), []):
                if up not in seen:
                    seen.add(up)
                    stack.append(up)
        return seen

    def find_cycle(self) -> list[str] | None:
        """One cycle as a closed path (a -> b -> a), or None."""
        state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
        path: list[str] = []

        def visit(key: str) -> list[str] | None:
            state[key] = 1
            path.append(key)
            for up in self.upstreams.get(key, []):
                if state.get(up) == 1:
                    return path[path.index(up):] + [up]
                if up not in state and (found := visit(up)):
                    return found
            path.pop()
            state[key] = 2
            return None

        for key in self.resources:
            if key not in state and (found := visit(key)):
                return list(reversed(found))  # upstream first reads as data flow
        return None

    def order(self) -> list[str]:
        """Topological order, upstreams first, ties kept in manifest order; raises CycleError."""
        cycle = self.find_cycle()
        if cycle:
            raise CycleError(cycle)
        done: list[str] = []
        placed: set[str] = set()

        def place(key: str) -> None:
            if key in placed:
                return
            for up in self.upstreams.get(key, []):
                place(up)
            placed.add(key)
            done.append(key)

        for key in self.resources:
            place(key)
        return done

    def __iter__(self) -> Iterator[str]:
        return iter(self.order())
