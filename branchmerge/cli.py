"""The ``branchmerge`` command line.

Each command lives in the module that owns it and exposes ``register(subparsers)``; registration is
lazy about heavy imports (torch, kopf) so ``branchmerge --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module paths whose register(subparsers) adds a command; order = order in --help
COMMAND_MODULES = [
    "branchmerge.commands.validate",
    "branchmerge.commands.render",
    "branchmerge.commands.crds",
    "branchmerge.commands.stage",
    "branchmerge.commands.run",
    "branchmerge.commands.status",
    "branchmerge.commands.report",
    "branchmerge.commands.lineage",
    "branchmerge.commands.quickstart",
    "branchmerge.commands.compare",
    "branchmerge.commands.rescore",
    "branchmerge.commands.convert",
    "branchmerge.commands.operator",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="branchmerge",
        description="Branch-Merge distillation: TeacherGen -> BranchSFT -> Merge -> Eval, on one machine or on Kubernetes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # vLLM spawns workers that re-import the entry module: keep this guard
    sys.exit(main())
