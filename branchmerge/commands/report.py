"""``branchmerge report [--workdir DIR] [-o report.html]``: one self-contained HTML page about a local run."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("report", help="write an HTML report of a local run (graph, timings, losses, scores)")
    p.add_argument("--workdir", default=None, help="the run's workdir (default: ./.branchmerge)")
    p.add_argument("-o", "--output", default=None, help="HTML file to write (default: <workdir>/report.html)")
    p.set_defaults(func=run)


def run(args) -> int:
    from branchmerge.report import write_report
    from branchmerge.operator.local.workdir import Workdir

    workdir = Workdir.at(args.workdir)
    if not (workdir.root / "status").is_dir():
        print(f"error: {workdir.root}: no local run here (run `branchmerge run -f DIR` first)", file=sys.stderr)
        return 1
    path = write_report(workdir, args.output)
    print(f"report: {path}")
    return 0
