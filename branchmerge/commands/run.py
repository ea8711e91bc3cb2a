"""``branchmerge run -f DIR|FILE``: run manifests on this machine (the embedded control plane)."""
from __future__ import annotations

import os
import sys


def register(sub) -> None:
    p = sub.add_parser("run", help="run manifests on this machine as a DAG of local stage processes")
    p.add_argument("-f", "--filename", action="append", required=True, metavar="PATH",
                   help="a manifest file or a folder of them (repeatable)")
    p.add_argument("--workdir", default=None, help="status, logs and default outputs (default: ./.branchmerge)")
    p.add_argument("--only", nargs="+", metavar="NAME", default=[],
                   help="run only these stages (their upstreams must have succeeded already); always reruns them")
    p.add_argument("--from", dest="from_", metavar="NAME",
                   help="rerun this stage and run everything downstream of it (cache applies downstream)")
    p.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="stages to run at the same time (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="rerun selected stages even if cached")
    p.add_argument("--plain", action="store_true", help="plain log lines instead of the live view")
    p.set_defaults(func=run)


def run(args) -> int:
    from branchmerge.api.manifests import load
    from branchmerge.operator.local.display import make_display
    from branchmerge.operator.local.runner import RunOptions
    from branchmerge.operator.local.runner import run_and_summarise
    from branchmerge.operator.local.workdir import Workdir

    manifests = load(args.filename)
    if manifests.ok and not manifests.resources:
        print("error: no branchmerge.dev manifests found in " + ", ".join(args.filename), file=sys.stderr)
        return 2
    if args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    workdir = Workdir.at(args.workdir)
    options = RunOptions(jobs=args.jobs, only=args.only, from_=args.from_, no_cache=args.no_cache)
    return run_and_summarise(manifests, workdir, options, make_display(plain=True if args.plain else None))
