"""``branchmerge quickstart [DIR]``: the CPU quickstart -- Branch-Merge end to end on tiny local models."""
from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="run the CPU quickstart: teacher -> traces -> 3 branches -> merges -> "
                                          "evals -> report (about 10 minutes on 2 cores)")
    p.add_argument("workdir", nargs="?", default="quickstart-run",
                   help="folder for inputs, manifests, outputs and the report (default: %(default)s)")
    p.add_argument("--size", choices=["full", "reduced"], default="full",
                   help="reduced: less data and fewer steps (the CI smoke test)")
    p.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--prepare-only", action="store_true", help="write inputs and manifests, do not run")
    p.add_argument("--plain", action="store_true", help="plain log lines instead of the live view")
    p.set_defaults(func=run)


def run(args) -> int:
    from branchmerge.quickstart.main import main

    return main(args.workdir, args.size, args.jobs, args.prepare_only, True if args.plain else None)
