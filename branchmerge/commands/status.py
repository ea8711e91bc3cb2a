"""``branchmerge status [--workdir DIR] [-o yaml|json NAME]``: the local control plane's `kubectl get`."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("status", help="show the status of the stages of a local run (like kubectl get)")
    p.add_argument("name", nargs="?", help="one stage: name or Kind/name")
    p.add_argument("--workdir", default=None, help="the run's workdir (default: ./.branchmerge)")
    p.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    p.set_defaults(func=run)


def run(args) -> int:
    from branchmerge.operator.local.status_files import StatusFiles
    from branchmerge.operator.local.table import find, get_table, render
    from branchmerge.operator.local.workdir import Workdir

    workdir = Workdir.at(args.workdir)
    records = StatusFiles(workdir).all()
    if not records:
        print(f"error: no stages found in {workdir.root} (run `branchmerge run -f DIR` first)", file=sys.stderr)
        return 1
    if args.name:
        records = find(records, args.name)
        if not records:
            print(f"error: {args.name}: not found in {workdir.root}", file=sys.stderr)
            return 1
        if len(records) > 1 and args.output != "table":
            names = ", ".join(f"{r['kind']}/{r['metadata']['name']}" for r in records)
            print(f"error: {args.name} is ambiguous ({names}): write Kind/name", file=sys.stderr)
            return 1
    if args.output == "table":
        print(get_table(records))
    else:
        print(render(records[0], args.output), end="")
    return 0
