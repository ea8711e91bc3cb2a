"""The operator image stays small: importing the operator (and its CLI command) never pulls in torch."""
from __future__ import annotations

import subprocess
import sys


def test_operator_never_imports_torch():
    code = ("import sys\n"
            "import branchmerge.operator.controller, branchmerge.operator.plan, branchmerge.operator.pods.job\n"
            "import branchmerge.operator.metrics, branchmerge.operator.kube, branchmerge.commands.operator\n"
            "from branchmerge.cli import build_parser\n"
            "build_parser()\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'vllm', 'deepspeed', 'safetensors', 'numpy'))\n"
            "print(heavy)\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
