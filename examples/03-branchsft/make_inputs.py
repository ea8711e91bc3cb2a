"""Inputs of examples/03-branchsft: a tiny base model and two datasets of worked arithmetic solutions.

    python examples/03-branchsft/make_inputs.py [OUT]

OUT defaults to /tmp/branchmerge-examples/03-branchsft, where branchsft.yaml looks. The questions come from
the quickstart's synthetic math domain ("Compute 7-4+2.", answered step by step with a \\boxed{} result).
"""
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from branchmerge.quickstart.domains import corpus, tasks, user_message
from branchmerge.trainer.tiny import build_tiny_model, build_tokenizer

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/branchmerge-examples") / Path(__file__).parent.name
build_tiny_model(out / "base", tokenizer=build_tokenizer(corpus()), seed=0)
math = tasks("math", 96, seed=1)
# the traces in chat form, as a TeacherGen publishes them
with open(out / "math-traces.jsonl", "w") as f:
    for t in math[:64]:
        messages = [{"role": "user", "content": user_message("math", t)},
                    {"role": "assistant", "content": t["solution"]}]
        f.write(json.dumps({"messages": messages}) + "\n")
# more solved questions in a table with columns of its own
pq.write_table(pa.Table.from_pylist([{"question": user_message("math", t), "solution": t["solution"]}
                                     for t in math[64:]]), out / "math-extra.parquet")
print(out)
