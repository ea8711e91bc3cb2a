"""Render the Helm chart with real Helm: the `helm` binary when it is on PATH, else the helm-python-sdk
package (Helm's Go SDK as a shared library, no binary; a pinned dev dependency). Neither available -> the
tests fail and say what to install: a missing renderer is a broken environment, not a reason to skip."""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from .helpers import CHART

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
RELEASE = "bm"
NAMESPACE = "branchmerge-system"


@functools.lru_cache(maxsize=None)
def renderer() -> str | None:
    """'helm' (binary), 'helm-python-sdk', or None."""
    if shutil.which("helm"):
        return "helm"
    if importlib.util.find_spec("helm_python") is None:
        return None
    return "helm-python-sdk"


def _sdk(action: str, values: dict, namespace: str = NAMESPACE):
    """helm-python-sdk in a child process (tests/deploy/helm_sdk.py)."""
    require_renderer()
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("helm_sdk.py")), action, str(CHART), RELEASE,
                           namespace], input=json.dumps(values), capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise RuntimeError(f"helm_sdk.py {action} crashed: {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout)
    if "error" in out:
        raise RenderError(out["error"])
    return out["result"]


MISSING_RENDERER = ("chart cannot be rendered: neither the `helm` binary is on PATH nor the helm-python-sdk "
                    "package is installed (a dev dependency: pip install -e '.[dev]', or helm-python-sdk==0.2.2)")


def require_renderer() -> str:
    """The renderer, or the test fails with what to install."""
    found = renderer()
    if found is None:
        pytest.fail(MISSING_RENDERER, pytrace=False)
    return found


class RenderError(Exception):
    pass


def render(values: dict | None = None, namespace: str = NAMESPACE) -> list[tuple[str, dict]]:
    """(template path, manifest) for every rendered object, in output order (NOTES.txt left out)."""
    return copy.deepcopy(_render(json.dumps(values or {}, sort_keys=True), namespace))


@functools.lru_cache(maxsize=None)
def _render(values_json: str, namespace: str) -> list[tuple[str, dict]]:
    values = json.loads(values_json)
    if require_renderer() == "helm":
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
            yaml.safe_dump(values, fh)
            fh.flush()
            proc = subprocess.run(["helm", "template", RELEASE, str(CHART), "--namespace", namespace,
                                   "-f", fh.name], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise RenderError(proc.stderr.strip())
        out, source = [], "?"
        for doc_text in proc.stdout.split("\n---"):
            for line in doc_text.splitlines():
                if line.startswith("# Source: "):
                    source = line[len("# Source: "):]
            doc = yaml.load(doc_text, Loader=LOADER)
            if doc:
                out.append((source, doc))
        return out
    files = _sdk("render", values, namespace)  # RenderError on a values schema or template error
    out = []
    for source in sorted(files):
        if source.endswith("NOTES.txt"):
            continue
        for doc in yaml.load_all(files[source], Loader=LOADER):
            if doc:
                out.append((source, doc))
    return out


def notes(values: dict | None = None) -> str:
    """NOTES.txt as Helm prints it after an install (helm-python-sdk only: `helm template` omits it)."""
    files = _sdk("render", values or {})
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def lint(values: dict | None = None) -> list[str]:
    """Lint errors and warnings (severity >= 2)."""
    if renderer() == "helm":
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
            yaml.safe_dump(values or {}, fh)
            fh.flush()
            proc = subprocess.run(["helm", "lint", "--strict", str(CHART), "-f", fh.name], capture_output=True, text=True,
                                  timeout=120)
        return [] if proc.returncode == 0 else [proc.stdout + proc.stderr]
    report = _sdk("lint", values or {})
    return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2] + report["errors"]


def by_kind(objects: list[tuple[str, dict]], kind: str) -> list[dict]:
    return [doc for _, doc in objects if doc.get("kind") == kind]
