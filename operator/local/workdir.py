"""Where the local control plane keeps things, one folder per pipeline (the "namespace" of a local run).

    <workdir>/status/<kind>/<name>.json     the CR (metadata, spec) with its status, like `kubectl get -o json`
    <workdir>/runs/<kind>/<name>/           resolved.yaml, result.json, progress.jsonl, stage.log of the last attempt
    <workdir>/outputs/<kind>/<name>/        default output of a stage whose spec sets no output.uri
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...api.uris import file_uri

DEFAULT_WORKDIR = ".branchmerge"


def split_key(key: str) -> tuple[str, str]:
    kind, _, name = key.partition("/")
    return kind, name


@dataclass(frozen=True)
class Workdir:
    root: Path

    @classmethod
    def at(cls, path: str | Path | None) -> "Workdir":
        return cls(Path(path or DEFAULT_WORKDIR).resolve())

    def status_file(self, key: str) -> Path:
        kind, name = split_key(key)
        return self.root / "status" / kind.lower() / f"{name}.json"

    def run_dir(self, key: str) -> Path:
        kind, name = split_key(key)
        return self.root / "runs" / kind.lower() / name

    def spec_file(self, key: str) -> Path:
        return self.run_dir(key) / "resolved.yaml"

    def result_file(self, key: str) -> Path:
        return self.run_dir(key) / "result.json"

    def progress_file(self, key: str) -> Path:
        return self.run_dir(key) / "progress.jsonl"

    def log_file(self, key: str) -> Path:
        return self.run_dir(key) / "stage.log"

    def default_output(self, key: str) -> str:
        kind, name = split_key(key)
        return file_uri(self.root / "outputs" / kind.lower() / name)

    def status_files(self) -> list[Path]:
        return sorted((self.root / "status").glob("*/*.json"))
