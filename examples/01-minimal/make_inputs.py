"""Inputs of examples/01-minimal: two tiny Qwen2 models with the same shapes and the same tokenizer.

    python examples/01-minimal/make_inputs.py [OUT]

OUT defaults to /tmp/branchmerge-examples/01-minimal, where merge.yaml looks (file:// URIs are absolute).
"""
import sys
from pathlib import Path

from branchmerge.trainer.tiny import build_tiny_model, build_tokenizer

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/branchmerge-examples") / Path(__file__).parent.name
tokenizer = build_tokenizer()  # shared: models with different vocabularies cannot be merged tensor by tensor
build_tiny_model(out / "model-a", seed=1, tokenizer=tokenizer)
build_tiny_model(out / "model-b", seed=2, tokenizer=tokenizer)
print(out)
