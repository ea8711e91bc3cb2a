"""MergeSearch on the local control plane: real Merge and Eval stages on a tiny model, cached on a rerun, the
winner used downstream through ``from: {kind: MergeSearch}``, the selection-on-the-test-set warning."""
from __future__ import annotations

import io

import pytest
import yaml

from branchmerge.api.manifests import load
from branchmerge.operator.local.display import PlainDisplay
from branchmerge.operator.local.runner import RunOptions, Runner
from branchmerge.operator.local.status_files import StatusFiles
from branchmerge.operator.local.workdir import Workdir
from branchmerge.operator.searchplan import SELECTION_ON_TEST
from branchmerge.trainer.tiny import fine_tuned_copy

pytestmark = pytest.mark.slow
REPO_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples" / "data"


def _manifests(folder, base, math, code, data):
    bench = {"name": "math-dev", "kind": "math", "limit": 2, "dataset": {"uri": data.as_uri()}}
    small_eval = {"engine": {"name": "transformers", "dtype": "float32"},
                  "sampling": {"temperature": 0.0, "maxTokens": 8, "seed": 0}}
    docs = [
        {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "MergeSearch", "metadata": {"name": "pick"},
         "spec": {"base": {"uri": base.as_uri()},
                  "branches": [{"name": "math", "model": {"uri": math.as_uri()}},
                               {"name": "code", "model": {"uri": code.as_uri()}}],
                  "space": [{"method": "linear", "weights": {"math": {"values": [0.5, 1.0]}}}],
                  "budget": {"maxTrials": 4, "parallelism": 2}, "sampler": {"name": "grid"},
                  "eval": {"benchmarks": [bench], **small_eval}}},
        # scores the winner on the search's own data: the search must warn (selection on the test set)
        {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Eval", "metadata": {"name": "final"},
         "spec": {"model": {"from": {"kind": "MergeSearch", "name": "pick"}}, "benchmarks": [bench], **small_eval}},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return folder


def _run(folder, workdir) -> tuple[int, Runner]:
    manifests = load([folder])
    assert manifests.ok, [str(p) for p in manifests.problems]
    runner = Runner(manifests, Workdir.at(workdir), RunOptions(jobs=2), PlainDisplay(io.StringIO(), interval=0))
    return runner.run(), runner


def test_search_runs_trials_as_cached_stages_and_publishes_the_winner(tiny_model, tmp_path):
    math = fine_tuned_copy(tiny_model, tmp_path / "math", 1)
    code = fine_tuned_copy(tiny_model, tmp_path / "code", 2)
    folder = _manifests(tmp_path / "m", tiny_model, math, code, REPO_DATA / "eval-math.jsonl")
    code_, runner = _run(folder, tmp_path / "work")
    assert code_ == 0, runner.failures()
    store = StatusFiles(Workdir.at(tmp_path / "work"))
    search = store.load("MergeSearch/pick")["status"]
    assert search["phase"] == "Succeeded"
    summary = search["metrics"]
    assert summary["trialsDone"] == summary["trialsTotal"] == 2
    assert len(summary["leaderboard"]) == 2 and summary["winner"]["method"] == "linear"
    children = sorted(runner.searches.children["MergeSearch/pick"])
    assert len(children) == 4 and sum(k.startswith("Merge/") for k in children) == 2
    winner_merge = next(k for k in children if k.startswith("Merge/") and
                        store.load(k)["spec"]["models"][0].get("weight") == summary["winner"]["params"]["weight.math"])
    assert search["output"] == store.load(winner_merge)["status"]["output"]
    final = store.load("Eval/final")
    assert final["status"]["phase"] == "Succeeded"
    warning = next(c for c in search["conditions"] if c["type"] == SELECTION_ON_TEST)
    assert warning["status"] == "True" and "Eval final" in warning["message"]

    # a rerun replays the search from the cache: every trial stage is Cached, same winner
    again, runner2 = _run(folder, tmp_path / "work")
    assert again == 0
    reasons = {k: next(c["reason"] for c in store.load(k)["status"]["conditions"] if c["type"] == "Ready")
               for k in runner2.searches.children["MergeSearch/pick"]}
    assert set(reasons.values()) == {"Cached"}, reasons
    assert store.load("MergeSearch/pick")["status"]["output"] == search["output"]
