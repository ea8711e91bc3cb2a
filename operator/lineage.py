"""The lineage tree of a CR on Kubernetes, read from the API server alone: each ``from:`` reference leads to
the upstream CR, whose status holds the output URI and digest it published; a ``uri:`` is a raw input, with
the hf:// commit its stage recorded (``status.metrics`` ``inputCommits.<uri>``). The outputs' manifests
live on volumes the CLI cannot read; the folders' own lineage (``branchmerge lineage URI``) has the rest."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from ..api.lineage import Node
from ..api.resources import KIND_INFO
from .kube import KubeClient

COMMITS = "inputCommits."


def _refs(spec: Any, path: str = "spec"):
    """(field path, ref) of every model/dataset reference in a CR's spec as written (from: or uri:)."""
    if isinstance(spec, dict):
        if isinstance(spec.get("from"), dict) or (isinstance(spec.get("uri"), str) and path != "spec.output"):
            yield path, spec
            return
        for key, value in spec.items():
            yield from _refs(value, f"{path}.{key}")
    elif isinstance(spec, list):
        for i, item in enumerate(spec):
            yield from _refs(item, f"{path}[{i}]")


def _kinds(target: str) -> tuple[list[str], str]:
    if "/" not in target:
        return list(KIND_INFO), target
    kind_text, _, name = target.partition("/")
    kinds = [k for k, info in KIND_INFO.items() if kind_text.lower() in (k.lower(), info.plural, *info.short_names)]
    return kinds, name


async def _node(kube: KubeClient, namespace: str, cr: dict, via: str, seen: frozenset) -> Node:
    status = cr.get("status") or {}
    output = status.get("output") or {}
    label = f"{cr['kind']}/{cr['metadata']['name']}"
    node = Node(output.get("uri") or "(not published)", output.get("digest"), label, via,
                record={"kind": cr["kind"], "name": cr["metadata"]["name"]})
    if label in seen:  # a cycle cannot pass validation; never loop on one anyway
        return node
    metrics = status.get("metrics") or {}
    for path, ref in _refs(cr.get("spec") or {}):
        if isinstance(ref.get("from"), dict):
            up_kind, up_name = ref["from"].get("kind"), ref["from"].get("name")
            up = await kube.get(up_kind, namespace, up_name) if up_kind in KIND_INFO else None
            if up is None:
                node.children.append(Node("(missing)", None, f"{up_kind}/{up_name}", path))
            else:
                node.children.append(await _node(kube, namespace, up, path, seen | {label}))
        else:
            node.children.append(Node(ref["uri"], None, "", path, commit=metrics.get(COMMITS + ref["uri"])))
    return node


async def cr_tree(connect: Callable[[], Awaitable[Any]], namespace: str, target: str) -> Node | None:
    """The tree of ``target`` (Kind/name, or a name looked up in every kind)."""
    kube = KubeClient(connect)
    try:
        kinds, name = _kinds(target)
        for kind in kinds:
            cr = await kube.get(kind, namespace, name)
            if cr is not None:
                return await _node(kube, namespace, cr, "", frozenset())
        return None
    finally:
        await kube.close()
