"""Run helm-python-sdk in a child process: it loads Helm's Go runtime as a shared library, which should not
share a process (signals, threads, fork) with the rest of the test session.

    python helm_sdk.py render|lint|notes CHART RELEASE NAMESPACE  < values.json  > result.json
"""
from __future__ import annotations

import json
import sys


def main() -> int:
    import helm_python as helm

    action, chart_dir, release, namespace = sys.argv[1:5]
    values = json.load(sys.stdin)
    try:
        if action == "lint":
            result = helm.lint(chart_dir, values, strict=True, kube_version="v1.30.0")
        else:
            with helm.Chart.load(chart_dir) as chart:
                result = chart.render(values, name=release, namespace=namespace)
    except helm.HelmError as exc:
        json.dump({"error": str(exc)}, sys.stdout)
        return 0
    json.dump({"result": result}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
