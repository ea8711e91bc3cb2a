"""Merge stage: a streaming, bounded-memory model-merge engine over safetensors folders.

Layout (one job per module):
- ``safetensors_io``: validated header parsing, zero-copy memory-mapped tensors whose pages are released after
  use; a writer that lays out shard headers up front, takes tensors (or row blocks) at their places from
  several threads, and hashes and flushes each shard as it completes.
- ``model_folder``: a HF folder (single file or shards + index) as named tensors.
- ``layout``: the output's tensors checked across inputs (missing/extra tensors, shapes, tied embeddings,
  vocabulary rows trimmed to the common size), before anything is written.
- ``params``: per-method parameter checks and per-tensor overrides (regex, first match wins).
- ``methods/``: one module per merge method (mergekit semantics, TinyR1's Arcee Fusion), each written over
  cache-sized blocks of rows; whole-tensor statistics (magnitude cut, norms, quantiles) come from passes first.
- ``kernels``: the methods' hot loops fused with numba, bit-identical to their torch code (float32 blocks).
- ``engine``: the tensor loop (small tensors whole, the rest in row blocks; as many tensors at once as the
  thread budget allows), metrics and progress.
- ``assets``: config, generation config, tokenizer and chat template; ``stage``: the entry point.
"""
