"""The CLI as a user runs it: exit codes and one-line errors with file, document and field path."""
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import manifest

REPO = Path(__file__).resolve().parents[1]


def bm(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "branchmerge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_validate_examples_passes():
    out = bm("validate", "-f", "examples/")
    assert out.returncode == 0, out.stderr
    assert "valid; run order:" in out.stdout and "Merge/math-science" in out.stdout


def test_validate_broken_manifest_gives_one_line_error_with_field_path(tmp_path):
    doc = yaml.safe_load((REPO / "examples/tinyr1/02-merge.yaml").read_text().split("---")[0])
    doc["spec"]["models"][1]["weight"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = bm("validate", "-f", str(path))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert f"error: {path}: spec.models[1].weight: must be > 0" in lines
    assert lines[-1] == "1 error(s)"


def test_validate_reports_cycle(tmp_path):
    docs = []
    for name, other in (("a", "b"), ("b", "a")):
        docs.append(manifest("Merge", name, {"method": "linear", "models": [{"from": {"kind": "Merge", "name": other}}]}))
    path = tmp_path / "cycle.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = bm("validate", "-f", str(path))
    assert out.returncode == 1 and "dependency cycle: Merge/" in out.stderr


def test_validate_unreadable_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("kind: [unclosed\n")
    out = bm("validate", "-f", str(path))
    assert out.returncode == 1 and f"error: {path}: cannot read" in out.stderr


def test_validate_empty_folder_is_an_error(tmp_path):
    out = bm("validate", "-f", str(tmp_path))
    assert out.returncode == 1 and "no branchmerge.dev manifests" in out.stderr


def test_crds_command_writes_what_is_committed(tmp_path):
    out = bm("crds", "--out", str(tmp_path))
    assert out.returncode == 0
    for path in (REPO / "crds").glob("*.yaml"):
        assert (tmp_path / path.name).read_text() == path.read_text()


def test_help_lists_working_commands():
    out = bm("--help")
    assert out.returncode == 0
    for command in ("validate", "crds", "stage"):
        assert command in out.stdout


def test_stage_rejects_unresolved_refs_with_exit_2(tmp_path):
    doc = yaml.safe_load((REPO / "examples/tinyr1/02-merge.yaml").read_text().split("---")[0])
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    out = bm("stage", "merge", "--spec", str(spec), "--result", str(tmp_path / "result.json"))
    assert out.returncode == 2
    assert "from: references must be resolved" in out.stderr
    import json
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["phase"] == "Failed" and result["exitCode"] == 2
