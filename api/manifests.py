"""Load manifests from files and folders of multi-document YAML and check them as a set."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml

from .graph import Dag
from .resources import CustomResource
from .validation import FieldError, InvalidManifest, parse_resource

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Problem:
    """An error located in a file, a document of that file, and a field path."""

    source: str
    error: FieldError

    def __str__(self) -> str:
        return f"{self.source}: {self.error}"


@dataclass
class ManifestSet:
    resources: list[CustomResource] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # Kind/name -> file#doc
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def dag(self) -> Dag:
        return Dag.build(self.resources)


def manifest_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in MANIFEST_SUFFIXES and f.is_file())
        else:
            files.append(p)
    return files


def _documents(path: Path) -> list:
    text = path.read_text()
    docs = list(yaml.safe_load_all(text))
    return [d for d in docs if d is not None]


def _is_ours(doc) -> bool:
    """Folders may hold other YAML (kustomization, values): only our API group is ours."""
    return isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("branchmerge.dev/")


def load(paths: Iterable[str | Path], strict_files: bool = True) -> ManifestSet:
    """Parse every branchmerge document under ``paths`` and check the set (duplicates, refs, cycles).

    Files named explicitly must be all ours when ``strict_files``; in folders, foreign documents are skipped.
    """
    result = ManifestSet()
    explicit = {Path(p) for p in paths if not Path(p).is_dir()}
    for path in manifest_files(paths):
        try:
            docs = _documents(path)
        except (OSError, yaml.YAMLError) as err:
            result.problems.append(Problem(str(path), FieldError("", f"cannot read: {err}")))
            continue
        for index, doc in enumerate(docs):
            source = f"{path}#{index}" if len(docs) > 1 else str(path)
            if not _is_ours(doc) and not (strict_files and path in explicit):
                continue
            try:
                resource = parse_resource(doc)
            except InvalidManifest as err:
                result.problems += [Problem(source, e) for e in err.errors]
                continue
            if resource.key in result.sources:
                result.problems.append(Problem(source, FieldError(
                    "metadata.name", f"duplicate {resource.key} (also in {result.sources[resource.key]})")))
                continue
            result.sources[resource.key] = source
            result.resources.append(resource)
    _check_graph(result)
    return result


def _check_graph(result: ManifestSet) -> None:
    dag = result.dag()
    for key, ref in dag.dangling:
        result.problems.append(Problem(result.sources[key], FieldError(
            ref.path, f"refers to {ref.key}, which is not among the manifests")))
    cycle = dag.find_cycle()
    if cycle:
        result.problems.append(Problem(result.sources[cycle[0]], FieldError(
            "", "dependency cycle: " + " -> ".join(cycle))))
