"""``branchmerge crds --out DIR``: write the CRDs generated from the API models."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("crds", help="generate the CustomResourceDefinitions from the API models")
    p.add_argument("--out", default="crds", help="output folder (default: crds)")
    p.add_argument("--docs", metavar="FILE", help="also write the markdown API reference here")
    p.set_defaults(func=run)


def run(args) -> int:
    from branchmerge.api.crdgen import write_all

    for path in write_all(args.out):
        print(path)
    if args.docs:
        from pathlib import Path

        from branchmerge.api.reference import render_reference

        Path(args.docs).parent.mkdir(parents=True, exist_ok=True)
        Path(args.docs).write_text(render_reference())
        print(args.docs)
    return 0
