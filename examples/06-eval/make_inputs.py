"""Inputs of examples/06-eval: a tiny model to score and the three small benchmarks of examples/data/.

    python examples/06-eval/make_inputs.py [OUT]

OUT defaults to /tmp/branchmerge-examples/06-eval, where eval.yaml looks. The model is untrained: it shows
how an Eval runs and what it writes, not a score worth reading.
"""
import shutil
import sys
from pathlib import Path

from branchmerge.trainer.tiny import build_tiny_model

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/branchmerge-examples") / Path(__file__).parent.name
build_tiny_model(out / "model", seed=0)
for name in ("eval-mcq.jsonl", "eval-math.jsonl", "eval-code.jsonl"):
    shutil.copy(Path(__file__).resolve().parents[1] / "data" / name, out / name)
print(out)
