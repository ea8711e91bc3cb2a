"""Paths and small loaders shared by the deployment-asset tests."""
from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "branchmerge"
IMAGES = REPO / "images"
DEPLOY = REPO / "deploy"
CRDS = REPO / "crds"
DOCS = REPO / "docs"
HEALTH_LUA = DEPLOY / "argocd" / "health.lua"
KUBERNETES_VERSION = "1.30.0"  # oldest minor the chart supports (Chart.yaml kubeVersion)


def load_yaml_docs(path: Path) -> list[dict]:
    """Every non-empty document of a YAML file."""
    with open(path, encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]
