"""Lineage and model cards on real Merge stage outputs: what each published folder records of its inputs
(digests computed here independently), the tree back to the raw inputs, `branchmerge lineage`, and the card:
its hub front matter, Eval scores added without changing the model's digest, concurrent Evals."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from branchmerge import __version__
from branchmerge.api.lineage import read_lineage, render_tree, tree
from branchmerge.api.outputs import CARD, read_manifest
from branchmerge.trainer import card
from branchmerge.trainer.stage import run_stage
from branchmerge.trainer.tiny import perturbed, random_tensors, write_model
from tests.trainer.merge.merge_models import layer_shapes, merge_manifest, write_manifest

LICENSED = "---\nlicense: apache-2.0\nlanguage: en\n---\n# base\n"


def _digest_by_hand(folder: Path) -> str:
    """The combined digest of a raw folder: sha256 over sorted (name, sha256 of the file) lines."""
    h = hashlib.sha256()
    for p in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{p.relative_to(folder)}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return "sha256:" + h.hexdigest()


def _stage(tmp_path: Path, manifest: dict) -> dict:
    name = manifest["metadata"]["name"]
    code = run_stage("merge", write_manifest(tmp_path / f"{name}.yaml", manifest), tmp_path / f"{name}.json")
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert code == 0, result
    return result


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Raw base (declares a licence), a, b; m1 = ties(a, b) on base; m2 = slerp(m1, b) with m1 as base."""
    tmp = tmp_path_factory.mktemp("lineage")
    base = random_tensors(layer_shapes(), 0)
    raw = {"base": write_model(tmp / "base", base, extra_files={"README.md": LICENSED}),
           "a": write_model(tmp / "a", perturbed(base, 1)), "b": write_model(tmp / "b", perturbed(base, 2))}
    r1 = _stage(tmp, merge_manifest("m1", "ties", tmp / "m1", [raw["a"], raw["b"]], base=raw["base"],
                                    parameters={"density": 0.5}, seed=7))
    r2 = _stage(tmp, merge_manifest("m2", "slerp", tmp / "m2", [tmp / "m1", raw["b"]], base=tmp / "m1",
                                    parameters={"t": 0.3}))
    return tmp, raw, r1, r2


def test_the_manifest_records_inputs_spec_versions_seeds_and_cost(chain):
    tmp, raw, r1, _ = chain
    lineage = read_lineage(tmp / "m1")
    assert lineage["kind"] == "Merge" and lineage["name"] == "m1"
    assert lineage["digest"] == r1["digest"]  # the manifest read back is the one the stage reported
    assert lineage["spec"]["method"] == "ties" and "resources" not in lineage["spec"]
    inputs = {e["path"]: e for e in lineage["inputs"]}
    assert set(inputs) == {"spec.base", "spec.models[0]", "spec.models[1]"}
    for path, name in (("spec.base", "base"), ("spec.models[0]", "a"), ("spec.models[1]", "b")):
        assert inputs[path]["uri"] == raw[name].resolve().as_uri()
        assert inputs[path]["digest"] == _digest_by_hand(raw[name]), path
        assert "published" not in inputs[path]  # raw: the tree ends there
    assert inputs["spec.base"]["license"] == "apache-2.0"
    assert lineage["seeds"] == {"spec.seed": 7}
    assert lineage["code"]["branchmerge"] == __version__
    assert lineage["libraries"]["torch"] == torch.__version__
    cost = lineage["cost"]
    assert 0 < cost["wallSeconds"] and 0 < cost["cpuSeconds"] and cost["peakMemoryBytes"] > 50 << 20
    assert cost["gpus"] == 0 and cost["gpuSeconds"] == 0


def test_the_tree_goes_back_to_the_raw_inputs(chain):
    tmp, raw, r1, r2 = chain
    root = tree((tmp / "m2").resolve().as_uri())
    assert (root.label, root.digest) == ("Merge/m2", r2["digest"])
    by_via = {c.via: c for c in root.children}
    assert set(by_via) == {"spec.base", "spec.models[0]", "spec.models[1]"}
    for via in ("spec.base", "spec.models[0]"):  # m1 read twice: as the base and as a model
        assert (by_via[via].label, by_via[via].digest) == ("Merge/m1", r1["digest"])
        assert {c.uri for c in by_via[via].children} == {raw[n].resolve().as_uri() for n in ("base", "a", "b")}
    assert by_via["spec.models[1]"].record is None and by_via["spec.models[1]"].digest == _digest_by_hand(raw["b"])
    text = render_tree(root)
    assert text.splitlines()[0].startswith("Merge/m2") and text.count("Merge/m1") == 2
    assert text.count("(inputs shown above)") == 1
    assert text.count("(raw input)") == 4  # base, a, b under the first m1, and b under m2

    cli = [sys.executable, "-m", "branchmerge.cli", "lineage"]
    out = subprocess.run(cli + [str(tmp / "m2")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == text, out.stderr
    as_json = json.loads(subprocess.run(cli + [(tmp / "m2").as_uri(), "-o", "json"], capture_output=True,
                                        text=True, timeout=120).stdout)
    assert as_json["kind"] == "Merge" and as_json["inputs"][0]["name"] == "m1"
    bad = subprocess.run(cli + [str(raw["a"])], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "not a published output with a lineage" in bad.stderr


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


def test_each_published_model_has_a_card_outside_its_digest(chain):
    tmp, _, r1, _ = chain
    text = (tmp / "m1" / CARD).read_text()
    meta = _front_matter(text)
    assert meta["license"] == "apache-2.0" and "merge" in meta["tags"] and "model-index" not in meta
    assert "a merge (ties)" in text and '"density": 0.5' in text and "## Lineage" in text
    assert "No Eval of this model had finished" in text
    assert CARD not in read_manifest(tmp / "m1")  # the card describes the output, it is not part of it


def _eval_output(folder: Path, scores: dict[str, float]) -> Path:
    """An Eval output's results.json in the Eval stage's shape (trainer/eval/stage.py); the real Eval stage
    writes one in tests/local/test_quickstart_provenance.py."""
    folder.mkdir(parents=True)
    results = {"score": sum(scores.values()) / len(scores), "createdAt": "2026-12-06T00:00:00Z",
               "benchmarks": {n: {"pass1": s, "stderr": 0.05, "samples": 4, "n": 30, "meanTokens": 812.5}
                              for n, s in scores.items()}}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_evals_add_their_scores_to_the_card_and_leave_the_digest_alone(chain):
    tmp, _, _, r2 = chain
    model = tmp / "m2"
    evals = [_eval_output(tmp / f"eval-{i}", {"aime": 0.1 * i, "gpqa": 0.05 * i}) for i in range(1, 7)]
    threads = [threading.Thread(target=card.record_eval, args=(model, f"e{i}", d))
               for i, d in enumerate(evals, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    meta = _front_matter((model / CARD).read_text())
    results = meta["model-index"][0]["results"]
    assert len(results) == 12  # every concurrent Eval is in the last render: two benchmarks each
    assert sorted(r["metrics"][0]["value"] for r in results if r["dataset"]["name"] == "aime") == \
        pytest.approx([0.1 * i for i in range(1, 7)])
    text = (model / CARD).read_text()
    assert "| e3 | aime | 0.300 | 0.050 | 4 | 30 | 812.5 |" in text
    files = read_manifest(model)
    assert not any(f.startswith("_card/") or f == CARD for f in files)
    from branchmerge.api.outputs import combined_digest, folder_digests

    assert combined_digest(folder_digests(model)) == r2["digest"]  # re-hashed now: still the same identity


def test_an_eval_of_a_model_on_a_read_only_volume_reports_and_does_not_fail(chain, tmp_path, monkeypatch,
                                                                               capsys):
    """On Kubernetes an Eval mounts its model's claim read-only unless it also writes there: the scores are
    published in the Eval's own output already, so the card is skipped with a message. (Tests run as root,
    which ignores file modes: the read-only filesystem is the error a write raises there.)"""
    import errno

    from branchmerge.api.validation import parse_resource

    tmp, _, _, _ = chain
    before = (tmp / "m1" / CARD).read_text()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp / "m1" / "_card"))

    monkeypatch.setattr(card, "write_json_atomic", read_only)
    resource = parse_resource({"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Eval", "metadata": {"name": "e"},
                               "spec": {"model": {"uri": (tmp / "m1").as_uri()}, "benchmarks": [{
                                   "name": "aime", "kind": "math", "dataset": {"uri": "file:///data/aime.jsonl"}}]}})
    card.after_publish(resource, _eval_output(tmp_path / "eval", {"aime": 0.5}))
    assert "model card not updated: [Errno 30] Read-only file system" in capsys.readouterr().err
    assert (tmp / "m1" / CARD).read_text() == before
