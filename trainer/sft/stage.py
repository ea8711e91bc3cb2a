"""``branchmerge stage sft``: fine-tune one branch (see train.py); returns the result metrics."""
from __future__ import annotations

import os
import sys

from .train import train


def run(ctx) -> dict:
    metrics = train(ctx)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # final barrier: every rank is done with collectives and files
        if ctx.rank != 0:
            # Non-zero ranks have nothing left to write; exiting now sidesteps the intermittent SIGABRT
            # ("terminate called without an active exception") seen when gloo/DeepSpeed threads are torn
            # down at interpreter exit.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        dist.destroy_process_group()
    return metrics
