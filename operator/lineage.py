"""The lineage tree of a CR on Kubernetes, read from the API server alone: each ``from:`` reference leads to
the upstream CR, whose status holds the output URI and digest it published; a ``uri:`` is a raw input, with
the hf:// commit its stage recorded (``status.metrics`` ``inputCommits.<uri>``). The outputs' manifests
live on volumes the CLI cannot read; the folders' own lineage (``branchmerge lineage URI``) has the rest."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from ..api.graph import input_refs
from ..api.lineage import Node
from ..api.resources import KIND_INFO
from .kube import KubeClient

COMMITS = "inputCommits."


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
    for ref in input_refs(cr.get("spec")):
        if ref.uri is None:  # from: an upstream CR
            up_kind, up_name = ref.upstream or (None, None)
            up = await kube.get(up_kind, namespace, up_name) if up_kind in KIND_INFO else None
            if up is None:
                node.children.append(Node("(missing)", None, ref.key or "(invalid from)", ref.path))
            else:
                node.children.append(await _node(kube, namespace, up, ref.path, seen | {label}))
        else:
            node.children.append(Node(ref.uri, None, "", ref.path, commit=metrics.get(COMMITS + ref.uri)))
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
