"""Inputs of examples/02-merge-methods: a tiny base model and two "fine-tunes" of it.

    python examples/02-merge-methods/make_inputs.py [OUT]

OUT defaults to /tmp/branchmerge-examples/02-merge-methods, where the manifests look. The fine-tunes are the
base plus a small seeded change of every weight: what a short fine-tuning does to a model, and what TIES
and SLERP are meant for (models that share a base).
"""
import sys
from pathlib import Path

from branchmerge.trainer.tiny import build_tiny_model, fine_tuned_copy

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/branchmerge-examples") / Path(__file__).parent.name
base = build_tiny_model(out / "base", seed=0)
fine_tuned_copy(base, out / "math", seed=1, scale=0.002)
fine_tuned_copy(base, out / "code", seed=2, scale=0.002)
print(out)
