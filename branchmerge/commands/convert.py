"""``branchmerge convert {aime,gpqa,livecodebench} IN OUT``: public benchmark files -> Eval JSONL."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert AIME / GPQA / LiveCodeBench files into the Eval benchmark JSONL")
    p.add_argument("layout", choices=["aime", "gpqa", "livecodebench"], help="the public layout of IN")
    p.add_argument("input", metavar="IN", help="a .parquet, .jsonl, .json or .csv file, or a folder of them")
    p.add_argument("output", metavar="OUT", help="the JSONL file to write")
    p.add_argument("--seed", type=int, default=0, help="gpqa: seed of the per-question option order (default 0)")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="livecodebench: keep problems with contest_date >= this")
    p.add_argument("--until", metavar="YYYY-MM-DD", help="livecodebench: keep problems with contest_date < this")
    p.add_argument("--limit", type=int, help="keep only the first N converted records")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from branchmerge.api.outputs import sha256_file
    from branchmerge.trainer.eval.convert import CONVERTERS, ConvertError, read_rows

    source = Path(args.input)
    try:
        rows = read_rows(source)
        options = {"aime": {}, "gpqa": {"seed": args.seed},
                   "livecodebench": {"since": args.since, "until": args.until}}[args.layout]
        records = CONVERTERS[args.layout](rows, source=str(source), **options)
    except (ConvertError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.limit is not None:
        records = records[: args.limit]
    if not records:
        print(f"error: {source}: no records left to write", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(f"{len(records)} {args.layout} records -> {out} (sha256 {sha256_file(out)[:16]}…)")
    return 0
