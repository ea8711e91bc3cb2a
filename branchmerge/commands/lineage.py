"""``branchmerge lineage NAME|URI``: what an output was made from, back to the raw inputs.

Locally (a stage of ``branchmerge run``, or any published folder's URI or path) the tree is read from the
outputs' ``_manifest.json`` lineage (trainer/lineage.py): digests, hf:// commits, specs, versions, seeds.
With ``--kubernetes`` it is read from the CRs: each ``from:`` reference leads to the upstream CR, whose
status gives its output URI and digest; the URIs are the raw inputs, with the commits their stage recorded.
"""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("lineage", help="print what an output was made from, back to the raw inputs")
    p.add_argument("target", help="a stage's name (Kind/name), or an output's URI or path")
    p.add_argument("--workdir", default=None, help="the local run's workdir (default: ./.branchmerge)")
    p.add_argument("--kubernetes", action="store_true", help="read the CRs of a cluster instead of a local run")
    p.add_argument("-n", "--namespace", default="default", help="with --kubernetes: the CRs' namespace")
    p.add_argument("--kubeconfig", default=None, help="with --kubernetes: kubeconfig (default: $KUBECONFIG)")
    p.add_argument("-o", "--output", choices=["tree", "json"], default="tree")
    p.set_defaults(func=run)


def _print(node, fmt: str) -> None:
    from branchmerge.api.lineage import render_tree

    print(json.dumps(node.to_dict(), indent=2) if fmt == "json" else render_tree(node))


def _local_uri(args) -> str | None:
    from pathlib import Path

    from branchmerge.operator.local.status_files import StatusFiles
    from branchmerge.operator.local.table import find
    from branchmerge.operator.local.workdir import Workdir

    if "://" in args.target:
        return args.target
    if Path(args.target).is_dir():
        return Path(args.target).resolve().as_uri()
    workdir = Workdir.at(args.workdir)
    found = find(StatusFiles(workdir).all(), args.target)
    if len(found) != 1:
        what = "not found" if not found else "ambiguous: write Kind/name"
        print(f"error: {args.target}: {what} in {workdir.root}", file=sys.stderr)
        return None
    uri = ((found[0].get("status") or {}).get("output") or {}).get("uri")
    if not uri or (found[0].get("status") or {}).get("phase") != "Succeeded":
        print(f"error: {args.target} has published no output yet", file=sys.stderr)
        return None
    return uri


def run(args) -> int:
    if args.kubernetes:
        import asyncio

        from branchmerge.operator.lineage import cr_tree

        from .operator import _connector

        node = asyncio.run(cr_tree(_connector(args.kubeconfig), args.namespace, args.target))
        if node is None:
            print(f"error: {args.target}: no such CR in namespace {args.namespace} (write Kind/name)",
                  file=sys.stderr)
            return 1
        _print(node, args.output)
        return 0
    from branchmerge.api.lineage import tree

    uri = _local_uri(args)
    if uri is None:
        return 1
    node = tree(uri)
    if node.record is None:
        print(f"error: {uri}: not a published output with a lineage (no _manifest.json lineage)", file=sys.stderr)
        return 1
    _print(node, args.output)
    return 0
