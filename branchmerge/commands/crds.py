"""``branchmerge crds --out DIR``: write the CRDs generated from the API models."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("crds", help="generate the CustomResourceDefinitions from the API models")
    p.add_argument("--out", default="crds", help="output folder (default: crds)")
    p.set_defaults(func=run)


def run(args) -> int:
    from branchmerge.api.crdgen import write_all

    for path in write_all(args.out):
        print(path)
    return 0
