"""``branchmerge rescore EVAL_OUTPUT [--out DIR]``: re-grade an Eval's saved generations with the current graders.

No model, engine or GPU: the samples in ``records/*.jsonl`` are graded again (code in the sandbox) and
aggregated as the Eval stage does. The new results are published beside the old ones
(``<EVAL_OUTPUT>/rescored/<UTC time>/`` unless ``--out``); the old files are not touched. Prints old and new
pass@1 per benchmark and the number of changed verdicts; exit 2 when the folder is not a published Eval output.
"""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("rescore", help="re-grade an Eval's saved generations with the current graders (no model)")
    p.add_argument("source", metavar="EVAL_OUTPUT", help="an Eval output folder or its URI (file://, pvc://, ...)")
    p.add_argument("--out", metavar="DIR", help="where to publish the new results "
                                                "(default: EVAL_OUTPUT/rescored/<UTC time>)")
    p.add_argument("--code-timeout", type=float, metavar="SECONDS",
                   help="wall-clock limit per code test run (default: the Eval's codeTimeoutSeconds)")
    p.add_argument("--dataset", action="append", default=[], metavar="BENCHMARK=PATH",
                   help="for records saved without grading material: read this benchmark's references from "
                        "PATH instead of the dataset the Eval recorded")
    p.add_argument("--json", action="store_true", help="print the new results.json instead of a table")
    p.set_defaults(func=run)


def _path(source: str):
    from pathlib import Path

    from branchmerge.api.uris import UnresolvableUri, local_path

    if "://" not in source:
        return Path(source)
    try:
        return local_path(source)
    except UnresolvableUri as err:
        raise ValueError(f"{source}: {err}") from None


def run(args) -> int:
    import json
    from pathlib import Path

    from branchmerge.trainer.errors import InvalidInput
    from branchmerge.trainer.eval.rescore import default_output, open_source, rescore
    from branchmerge.trainer.eval.report import pct

    datasets = {}
    for item in args.dataset:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            print(f"error: --dataset {item!r}: expected BENCHMARK=PATH", file=sys.stderr)
            return 2
        datasets[name] = Path(path)
    if args.code_timeout is not None and args.code_timeout <= 0:
        print("error: --code-timeout must be positive", file=sys.stderr)
        return 2
    try:
        source = open_source(_path(args.source))
        out = Path(args.out) if args.out else default_output(source.folder)
        if out.resolve() == source.folder.resolve():
            raise InvalidInput("--out is the source folder: rescore writes beside the old results, never over them")
        results, changes = rescore(source, out, code_timeout=args.code_timeout, datasets=datasets)
    except (InvalidInput, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    rows = [("benchmark", "questions", "old pass@1 (%)", "new pass@1 (%)", "changed verdicts")]
    for name, b in results["benchmarks"].items():
        rows.append((name, str(b["n"]), pct(b["previous"]["pass1"]) if "pass1" in b["previous"] else "-",
                     f"{pct(b['pass1'])} ± {pct(b['stderr'])}", str(b["changedVerdicts"])))
    previous = results["rescore"]["previousScore"]
    rows.append(("score", "", pct(previous) if previous is not None else "-", pct(results["score"]),
                 str(len(changes))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    before, now = results["rescore"]["previousGraders"], results["graders"]
    print("graders: " + ("unchanged" if before == now else f"{(before or 'not recorded')[:19]} -> {now[:19]}"))
    print(f"re-graded {source.folder} -> {out}")
    return 0
