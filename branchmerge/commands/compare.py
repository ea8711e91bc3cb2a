"""``branchmerge compare RESULTS...``: several Eval results side by side (models x benchmarks, with output length)."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("compare", help="print Eval results side by side (pass@1 ± stderr and mean output tokens)")
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="results.json files or Eval output folders holding one")
    p.add_argument("--label", action="append", metavar="NAME",
                   help="row label for each RESULTS in order (default: the Eval's name)")
    p.add_argument("--format", choices=["markdown", "json"], default="markdown")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from branchmerge.trainer.eval.report import ResultsError, comparison, comparison_markdown, load_results

    try:
        results = [load_results(path) for path in args.results]
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.label and len(args.label) != len(results):
        print(f"error: --label given {len(args.label)} times for {len(results)} results", file=sys.stderr)
        return 2
    if args.format == "json":
        header, rows = comparison(results, args.label)
        print(json.dumps([dict(zip(header, row)) for row in rows], indent=2))
    else:
        print(comparison_markdown(results, args.label), end="")
    return 0
