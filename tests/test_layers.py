"""Layers point one way: api <- operator, api <- trainer; the CLI (branchmerge/) on top may import anything.

The contract both planes read (resources, URIs, the output manifest, progress events, exit codes, conditions,
label keys) is api/; the control planes (operator/) and the data plane (trainer/) build on it and never on each
other, so the operator image needs no trainer dependency and a stage needs no control-plane code. Every import
counts, including those inside functions and under TYPE_CHECKING, and a module named to importlib.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = ("branchmerge.commands", "branchmerge.cli", "branchmerge.quickstart", "branchmerge.__main__")
# layer -> the branchmerge packages it must not import
FORBIDDEN = {
    "api": ("branchmerge.operator", "branchmerge.trainer", *TOP),
    "operator": ("branchmerge.trainer", *TOP),
    "trainer": ("branchmerge.operator", *TOP),
}
IMPORT_FUNCTIONS = {"import_module", "__import__"}


def module_name(path: Path) -> tuple[str, bool]:
    """The dotted name a file is installed as (api/x.py -> branchmerge.api.x), and whether it is a package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "branchmerge":
        parts = parts[1:]
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(["branchmerge", *parts]), is_package


def imported(path: Path) -> list[tuple[int, list[str]]]:
    """(line, absolute modules) of every import statement in ``path``: ``from X import y`` names X, then X.y
    (y may be a module: ``from .. import trainer``)."""
    name, is_package = module_name(path)
    package = name if is_package else name.rpartition(".")[0]
    found: list[tuple[int, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, [module] + [f"{module}.{a.name}" for a in node.names if a.name != "*"]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in IMPORT_FUNCTIONS:
                found.append((node.lineno, [node.args[0].value]))
    return found


def violations(layer: str) -> list[str]:
    bad = []
    for path in sorted((REPO / layer).rglob("*.py")):
        for line, modules in imported(path):
            hits = [(m, f) for m in modules for f in FORBIDDEN[layer] if m == f or m.startswith(f + ".")]
            if hits:  # name the module itself, not the package it was imported from (from .trainer import x)
                module, layer_hit = next(((m, f) for m, f in hits if m != f), hits[0])
                bad.append(f"{path.relative_to(REPO)}:{line}: imports {module} ({layer}/ must not import {layer_hit})")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_one_way(layer):
    assert (REPO / layer).is_dir()
    found = violations(layer)
    assert not found, "\n".join(found)


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    """Relative, absolute, lazy and importlib imports are all resolved to the module they name."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "operator" / "local").mkdir(parents=True)
    source = ("import importlib\n"
              "from ...trainer import decontamination\n"
              "from ..api import conditions\n"
              "def f():\n"
              "    from branchmerge.trainer.uris import local_path\n"
              "    return importlib.import_module('branchmerge.trainer.sft.launch')\n")
    (tmp_path / "operator" / "local" / "x.py").write_text(source)
    found = violations("operator")
    assert sorted(v.split(" (")[0] for v in found) == [
        "operator/local/x.py:2: imports branchmerge.trainer.decontamination",
        "operator/local/x.py:5: imports branchmerge.trainer.uris",
        "operator/local/x.py:6: imports branchmerge.trainer.sft.launch"]
