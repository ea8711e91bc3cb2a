"""``branchmerge stage <teachergen|sft|merge|eval> --spec FILE [--result FILE]``: run one stage here."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("stage", help="run one stage from a resolved manifest (the entry point of pods and the local runner)")
    p.add_argument("stage", choices=["teachergen", "sft", "merge", "eval"])
    p.add_argument("--spec", required=True, help="one manifest whose refs are all uris (YAML or JSON)")
    p.add_argument("--result", help="write the result JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    """Runs the stage, which writes its result file and termination message. A stage module that declares
    ``ENDS_WITHOUT_TEARDOWN`` (merge, sft) then has the process end right here: the command is a process's
    whole job (pods, the local runner's subprocesses, each torchrun rank), so nothing comes after it."""
    import atexit
    import os
    import sys

    from branchmerge.trainer.stage import run_stage

    code = run_stage(args.stage, args.spec, args.result)
    module = sys.modules.get(f"branchmerge.trainer.{args.stage}.stage")  # None if it failed to import
    if getattr(module, "ENDS_WITHOUT_TEARDOWN", False):
        # Skip the interpreter's teardown: there torch unregisters its operator libraries one by one (~0.4 s,
        # a tenth of merging a 1 GB model) and, on multi-rank sft, gloo/DeepSpeed threads die with SIGABRT
        # ("terminate called without an active exception"), which would replace the stage's exit code.
        # The atexit handlers still run first: the last progress event is sent, logging is flushed.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
