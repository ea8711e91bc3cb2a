"""``branchmerge stage <teachergen|sft|merge|eval> --spec FILE [--result FILE]``: run one stage here."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("stage", help="run one stage from a resolved manifest (the entry point of pods and the local runner)")
    p.add_argument("stage", choices=["teachergen", "sft", "merge", "eval"])
    p.add_argument("--spec", required=True, help="one manifest whose refs are all uris (YAML or JSON)")
    p.add_argument("--result", help="write the result JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    """Runs the stage and, for a stage that declares nothing to tear down (merge), ends the process right
    away: the command is a process's whole job (pods, the local runner's subprocesses)."""
    import logging
    import os
    import sys

    from branchmerge.trainer.stage import run as run_stage

    code = run_stage(args.stage, args.spec, args.result)
    module = sys.modules.get(f"branchmerge.trainer.{args.stage}.stage")  # None if it failed to import
    if getattr(module, "ENDS_WITHOUT_TEARDOWN", False):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
