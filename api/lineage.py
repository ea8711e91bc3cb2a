"""The lineage tree both control planes print (``branchmerge lineage``): an output, the outputs and raw inputs
it was made from, each with its URI and digest. Built from the outputs' manifests (trainer/lineage.py) or from
the CRs' status (operator/lineage.py)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Node:
    """One output or raw input in a lineage tree."""

    uri: str
    digest: str | None = None
    label: str = ""  # Kind/name for outputs, the field path for a raw input's edge
    via: str = ""  # the field of the downstream spec that reads it
    commit: str | None = None
    record: dict | None = None  # the lineage record of a published output
    children: list["Node"] = field(default_factory=list)

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def to_dict(self) -> dict:
        out = {"uri": self.uri, "digest": self.digest}
        if self.record is not None:
            out["kind"], out["name"] = self.record["kind"], self.record["name"]
        for key in ("via", "commit"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.children:
            out["inputs"] = [c.to_dict() for c in self.children]
        return out


def render_tree(node: Node) -> str:
    """The tree as text, one node a line; an output read by several stages is expanded the first time only."""
    lines: list[str] = []
    expanded: set[str] = set()

    def line(n: Node, again: bool) -> str:
        parts = [f"{n.via}: " if n.via else "", n.label or "(raw input)", f"  {n.uri}"]
        if n.commit:
            parts.append(f"  @{n.commit[:12]}")
        if n.digest:
            parts.append(f"  {n.digest[:19]}")
        if again:
            parts.append("  (inputs shown above)")
        return "".join(parts)

    def visit(n: Node, prefix: str, last: bool, top: bool) -> None:
        again = bool(n.children) and n.uri in expanded
        text = line(n, again)
        lines.append(text if top else f"{prefix}{'└── ' if last else '├── '}{text}")
        if again:
            return
        expanded.add(n.uri)
        inner = "" if top else prefix + ("    " if last else "│   ")
        for i, child in enumerate(n.children):
            visit(child, inner, i == len(n.children) - 1, False)

    visit(node, "", True, True)
    return "\n".join(lines)
