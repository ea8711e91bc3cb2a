"""Lineage as both control planes read it: an input's content identity, and the tree ``branchmerge lineage``
prints -- an output, the outputs and raw inputs it was made from, each with its URI and digest. Read from the
outputs' manifests (``tree``; trainer/lineage.py writes the records) or from the CRs' status
(operator/lineage.py). The local cache keys a stage by its inputs' ``content_digest``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .outputs import MANIFEST, combined_digest, folder_digests, read_manifest, sha256_file
from .uris import UnresolvableUri, local_path

SMALL_FILE = 64 << 20  # hash files below this size; fingerprint larger ones


def _fingerprint(path: Path) -> str:
    """(name, size, mtime) of every file: the identity of a large unpublished input, re-hashing a 60 GB
    external model on every run would cost more than the run."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "stat:" + h.hexdigest()


def content_digest(uri: str, patterns: tuple[str, ...] = ()) -> str:
    """Identity of an input's content: a published folder's manifest digest, a small file's sha256, else a
    stat fingerprint; ``uri:`` for what cannot be read here (hf:// and s3:// are pinned by revision)."""
    try:
        path = local_path(uri, patterns) if not uri.startswith("hf://") else None
    except UnresolvableUri:
        path = None
    if path is None:
        return "uri:" + uri
    if not path.exists():
        return "missing:" + uri
    if path.is_dir():
        files = read_manifest(path)
        if files is not None:
            return combined_digest(files)
        if sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) <= SMALL_FILE:
            return combined_digest(folder_digests(path, output=False))
        return _fingerprint(path)
    if path.stat().st_size <= SMALL_FILE:
        return "sha256:" + sha256_file(path)
    return _fingerprint(path)


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


# ---- reading it back ------------------------------------------------------------------------------------


def read_lineage(folder: Path) -> dict | None:
    """The lineage record of a published folder (None: not published, or published before lineage)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    lineage = manifest.get("lineage")
    if not isinstance(lineage, dict):
        return None
    return {**lineage, "digest": combined_digest(manifest.get("files") or {}), "cost": manifest.get("cost")}


def tree(uri: str, via: str = "", seen: frozenset = frozenset()) -> Node:
    """The lineage tree of the output at ``uri``, back to the raw inputs (which have no manifest)."""
    try:
        folder = local_path(uri)
    except UnresolvableUri:
        folder = None
    record = read_lineage(folder) if folder is not None and uri not in seen else None
    if record is None:
        return Node(uri, via=via)
    node = Node(uri, record["digest"], f"{record['kind']}/{record['name']}", via, record=record)
    for entry in record.get("inputs") or []:
        if entry.get("published"):
            child = tree(entry["uri"], entry["path"], seen | {uri})
            if child.digest != entry.get("digest"):  # rewritten since: say which copy was read
                child.label += f" (now {child.digest}, read as {entry.get('digest')})"
        else:
            child = Node(entry["uri"], entry.get("digest"), via=entry["path"], commit=entry.get("commit"))
        node.children.append(child)
    return node
