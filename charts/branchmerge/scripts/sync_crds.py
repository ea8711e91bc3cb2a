#!/usr/bin/env python3
"""Copy the generated CRDs (repo crds/, written by `branchmerge crds`) into the chart, verbatim.

- branchmerge.dev CRDs -> files/crds/: rendered by templates/crds.yaml, so `helm upgrade` upgrades them
  (Helm never upgrades what sits in a chart's crds/ folder). They are read with .Files.Get instead of being
  templates themselves because their descriptions contain literal {{field}} placeholders.
- every other group (kopf.dev peering) -> crds/: installed by Helm before the templates, so the chart can
  create the peering objects in the same release; kopf's peering CRDs do not change between releases.

Usage: python charts/branchmerge/scripts/sync_crds.py [--check]   (--check: exit 1 if the chart is stale)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[1]
REPO_CRDS = CHART.parents[1] / "crds"
OWN_GROUP = "branchmerge.dev"


def planned() -> dict[Path, bytes]:
    """Chart path -> content, for every CRD in the repo's crds/."""
    out: dict[Path, bytes] = {}
    for source in sorted(REPO_CRDS.glob("*.yaml")):
        data = source.read_bytes()
        doc = yaml.safe_load(data)
        if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
            raise SystemExit(f"{source}: not a CustomResourceDefinition")
        folder = "files/crds" if doc["spec"]["group"] == OWN_GROUP else "crds"
        out[CHART / folder / source.name] = data
    return out


def stale(plan: dict[Path, bytes]) -> list[str]:
    problems = [f"{p.relative_to(CHART)}: differs from crds/{p.name}" for p, data in plan.items()
                if not p.exists() or p.read_bytes() != data]
    for folder in ("files/crds", "crds"):
        for existing in (CHART / folder).glob("*.yaml"):
            if existing not in plan:
                problems.append(f"{existing.relative_to(CHART)}: no longer in crds/")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift (exit 1)")
    args = parser.parse_args(argv)
    plan = planned()
    problems = stale(plan)
    if args.check:
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    for folder in ("files/crds", "crds"):
        for existing in (CHART / folder).glob("*.yaml"):
            if existing not in plan:
                existing.unlink()
    for path, data in plan.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        print(path.relative_to(CHART))
    return 0


if __name__ == "__main__":
    sys.exit(main())
