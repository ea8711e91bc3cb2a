"""``branchmerge stage sft``: fine-tune one branch (see train.py); returns the result metrics."""
from __future__ import annotations

from .train import train

# Every rank ends through the stage command's fast exit (branchmerge/commands/stage.py) once its result is
# written: after the final barrier nothing is left that needs the interpreter's teardown.
ENDS_WITHOUT_TEARDOWN = True


def run(ctx) -> dict:
    metrics = train(ctx)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # final barrier: every rank is done with collectives and files
        if ctx.rank == 0:
            # for a caller that goes on in this process (tests run single-rank stages in-process); the other
            # ranks only ever run under the stage command, which ends them without a teardown
            dist.destroy_process_group()
    return metrics
