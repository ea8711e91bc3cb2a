"""The input references of a spec, and the dependency graph of a set of CRs built from their ``from:``.

``input_refs`` is the one walker over a spec's references (``uri:`` or ``from:``): the dependency graph, the
resolver, the operator's watch store, Job storage and hf:// staging, lineage and the run report all read
references through it. The graph serves ``branchmerge validate`` (dangling refs, cycles), the local runner
(execution order) and the operator (which upstreams a CR waits for).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from .base import ApiModel
from .resources import CustomResource

# Spec fields that are not inputs: where the stage writes (its output, its checkpoints) and the pod shape
# (free-form string maps: a key named uri there is no reference).
NOT_INPUTS = frozenset({"output", "checkpointing", "resources"})


def ref_key(ref: dict | ApiModel | None) -> str | None:
    """What a reference points at, comparable across specs: Kind/name for ``from:``, the URI otherwise."""
    if isinstance(ref, ApiModel):
        ref = ref.wire()
    if not isinstance(ref, dict):
        return None
    source = ref.get("from")
    if isinstance(source, dict):
        return f"{source.get('kind')}/{source.get('name')}"
    uri = ref.get("uri")
    return uri if isinstance(uri, str) else None


@dataclass(frozen=True)
class InputRef:
    """One model or dataset reference of a spec: ``uri:`` or ``from:`` an upstream CR, and its siblings."""

    path: str  # field path of the reference object, e.g. spec.models[1] or spec.data[0].validation
    ref: dict  # the object as written (wire form): uri or from, allowPatterns, kind-specific fields

    @property
    def uri(self) -> str | None:
        uri = self.ref.get("uri")
        return uri if isinstance(uri, str) else None

    @property
    def allow_patterns(self) -> tuple[str, ...]:
        return tuple(self.ref.get("allowPatterns") or ())

    @property
    def upstream(self) -> tuple[str, str] | None:
        """(kind, name) of the ``from:`` target; None for a URI (or a ``from:`` missing either)."""
        source = self.ref.get("from")
        if isinstance(source, dict) and isinstance(source.get("kind"), str) and isinstance(source.get("name"), str):
            return source["kind"], source["name"]
        return None

    @property
    def key(self) -> str | None:
        return ref_key(self.ref)


def input_refs(spec: Any, path: str = "spec") -> Iterator[InputRef]:
    """Every input reference of a spec, in spec order, an enclosing reference before the ones it holds
    (``spec.data[0]``, then its ``validation``).

    ``spec`` is the wire form (a dict as written, resolved or not, validated or not: the operator's watch
    store reads raw specs) or a parsed spec model (walked as its wire form). A reference is an object with a
    ``from`` object or a ``uri`` string; the fields in ``NOT_INPUTS`` are not walked, so ``spec.output`` and
    ``spec.checkpointing`` (written by the stage) never show up. Filter on ``.uri`` or ``.upstream`` for one
    side: a resolved spec has URIs only.
    """
    if isinstance(spec, ApiModel):
        spec = spec.wire()
    if isinstance(spec, dict):
        if isinstance(spec.get("from"), dict) or isinstance(spec.get("uri"), str):
            yield InputRef(path, spec)
        for key, value in spec.items():
            if key not in NOT_INPUTS and isinstance(value, (dict, list)):
                yield from input_refs(value, f"{path}.{key}")
    elif isinstance(spec, list):
        for i, item in enumerate(spec):
            yield from input_refs(item, f"{path}[{i}]")


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
    """Every ``from:`` reference in the resource's spec, with the field path of its ``from``."""
    return [Reference(f"{r.path}.from", *r.upstream) for r in input_refs(resource.spec)  # type: ignore[attr-defined]
            if r.upstream]


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
