"""``branchmerge validate -f PATH...``: check manifests as the API server and the control planes would."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("validate", help="validate manifests (schema, rules, duplicates, from: refs, cycles); warn about training data that reaches a benchmark without a decontamination gate")
    p.add_argument("-f", "--filename", action="append", required=True, metavar="PATH",
                   help="a manifest file or a folder of them (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.set_defaults(func=run)


def rejection(result) -> list[str]:
    """What validate writes to stderr about a manifest set it rejects (empty: valid and not empty); shared
    with ``branchmerge render`` so both say the same."""
    if not result.ok:
        return [f"error: {problem}" for problem in result.problems] + [f"{len(result.problems)} error(s)"]
    if not result.resources:
        return ["error: no branchmerge.dev manifests found"]
    return []


def run(args) -> int:
    from branchmerge.api.manifests import load

    result = load(args.filename)
    lines = rejection(result)
    if lines:
        print("\n".join(lines), file=sys.stderr)
        return 1
    if not args.quiet:
        order = result.dag().order()
        print(f"{len(result.resources)} manifest(s) valid; run order: {', '.join(order)}")
        for line in warnings(result.resources):
            print(line, file=sys.stderr)
    return 0


def warnings(resources) -> list[str]:
    """Valid but risky: training data reaching a benchmark without a decontamination gate between them."""
    from branchmerge.api.decontamination_check import ungated

    return [f"warning: {u.message()}" for u in ungated(resources)]
