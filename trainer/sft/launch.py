"""Launching the sft stage on several local ranks (the local runner calls these).

``launch_command`` gives a torchrun command line (one node, N processes, gloo on CPU); torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT and OMP_NUM_THREADS=1 per rank. ``succeeded`` judges a finished
launch by its result file and published output, because 2-rank gloo runs occasionally abort at interpreter
exit (SIGABRT) after everything was written.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ...api.outputs import attempt_succeeded


def launch_command(spec_file: str | os.PathLike, result_file: str | os.PathLike | None, nprocs: int) -> list[str]:
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nprocs),
           "-m", "branchmerge.cli", "stage", "sft", "--spec", str(spec_file)]
    if result_file is not None:
        cmd += ["--result", str(result_file)]
    return cmd


def succeeded(returncode: int, result_file: str | os.PathLike) -> bool:
    """True if the launch succeeded, judged as the local runner judges any stage (api/outputs.py): a
    Succeeded result and exit 0, or an exit-time abort after the output was published intact."""
    try:
        result = json.loads(Path(result_file).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and attempt_succeeded(returncode, result)
