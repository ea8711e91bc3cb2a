"""hf:// staging (operator/pods/staging.py's stage-input init containers run trainer/staging.py) against a local
Hub: many pods at once download once, the folder only ever appears whole, a dead downloader's lock and
leftovers are taken over; dataset repositories, revisions and subpaths; the commit each input was staged at,
recorded beside it and in the output manifest of the stage that read it; failures classed as the Hub answers
(401/403/404 permanent with the Hub's words in the termination message, 500 retried), as the operator
reads them.

The pods' real command (taken from the Job the operator builds) runs as separate processes on one folder, as
pods do on a ReadWriteMany PVC, with the real ``huggingface_hub`` talking to ``hub_standin.HubStandIn`` through
``HF_ENDPOINT`` (what it does not emulate: its docstring)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from branchmerge.api.uris import local_path, parse_hf_uri, staged_name
from branchmerge.operator.failures import classify_failure
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import target
from branchmerge.operator.pods.job import build_job
from branchmerge.operator.pods.staging import STAGING_ROOT
from branchmerge.trainer.staging import SOURCE_FILE

from tests.conftest import manifest

from .hub_standin import HubStandIn

FILES = {f"model-{i:02d}.safetensors": bytes([i]) * 1000 for i in range(4)}
TOKEN = "hf_standin_secret_token_0123456789"
OPTS = OperatorOptions(staging_claim="hf-cache")


def _cr(kind: str, spec: dict) -> dict:
    return manifest(kind, "x", spec, metadata={"namespace": "ns", "uid": "u"})


def _merge(*uris: str, out: str = "pvc://out/m") -> dict:
    return _cr("Merge", {"method": "linear", "models": [{"uri": u} for u in uris], "output": {"uri": out}})


def _sft(data_uri: str) -> dict:
    return _cr("BranchSFT", {"base": {"uri": "pvc://models/base"}, "data": [{"uri": data_uri}],
                             "training": {"globalBatchSize": 8, "microBatchSize": 1},
                             "output": {"uri": "pvc://models/sft"}})


def _init_commands(doc: dict) -> list[list[str]]:
    """The stage-input init containers' commands of the Job the operator builds for ``doc``."""
    run = target(doc, {}, OPTS)
    assert not hasattr(run, "reason"), run
    pod = build_job(run, 1, OPTS)["spec"]["template"]["spec"]
    return [c["command"] for c in pod["initContainers"] if c["name"].startswith("stage-input")]


def _local(command: list[str], root: Path) -> list[str]:
    """The pod's command for this machine: its interpreter, the staging mount at ``root``."""
    assert command[:3] == ["python", "-m", "branchmerge.trainer.staging"], command
    dest = command[5]
    assert dest.startswith(STAGING_ROOT + "/")
    return [sys.executable, *command[1:5], str(root / dest[len(STAGING_ROOT) + 1:]), *command[6:]]


def _env(hub: HubStandIn, tmp_path: Path, token: str | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env |= hub.env() | {"HF_HOME": str(tmp_path / "hf-home"), "BRANCHMERGE_STAGING_POLL_SECONDS": "0.05",
                        "BRANCHMERGE_TERMINATION_LOG": str(tmp_path / "termination-log")}
    return env | ({"HF_TOKEN": token} if token else {}) | extra


@pytest.fixture()
def hub():
    with HubStandIn() as h:
        yield h


def test_many_pods_stage_once_and_never_show_a_partial_copy(tmp_path, hub):
    repo = hub.add("model", "org/base", FILES, slow={name: 0.2 for name in FILES})
    uri = "hf://org/base@main"
    [command] = _init_commands(_merge(uri, uri))
    command = _local(command, tmp_path / "staging")
    dest = tmp_path / "staging" / staged_name(uri)
    whole = set(FILES) | {SOURCE_FILE}
    seen_partial: list[set] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if dest.is_dir():
                names = {p.name for p in dest.iterdir()}
                if names != whole:
                    seen_partial.append(names)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        procs = [subprocess.Popen(command, env=_env(hub, tmp_path), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(5)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        stop.set()
        watcher.join()
    assert [p.returncode for p in procs] == [0] * 5, outs
    infos = [p for m, p in hub.requests if p.startswith("/api/models/org/base/revision/")]
    assert len(infos) == 1 and sorted(hub.downloads()) == sorted(  # one download of each file for five pods
        f"/org/base/resolve/{repo.commit}/{name}" for name in FILES)
    assert sum("already staged" in o for o in outs) == 4 and all(repo.commit in o for o in outs)
    assert {p.name for p in dest.iterdir()} == whole and not seen_partial
    assert {name: (dest / name).read_bytes() for name in FILES} == FILES
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no lock, no partial folder left


def test_a_dead_downloaders_lock_and_leftovers_are_taken_over(tmp_path, hub):
    repo = hub.add("model", "org/base", FILES, slow={"model-03.safetensors": 60})
    uri = "hf://org/base"
    [command] = _init_commands(_merge(uri, uri))
    command = _local(command, tmp_path / "staging")
    dest = tmp_path / "staging" / staged_name(uri)
    env = _env(hub, tmp_path, BRANCHMERGE_STAGING_STALE_SECONDS="1", BRANCHMERGE_STAGING_HEARTBEAT_SECONDS="0.2")
    first = subprocess.Popen(command, env=env, start_new_session=True)
    deadline = time.time() + 60
    while not list(dest.parent.glob(dest.name + ".partial-*/model-00.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the lock is fresh (heartbeat) while the holder lives: nobody takes it over
    assert dest.with_name(dest.name + ".lock").is_dir()
    os.killpg(first.pid, signal.SIGKILL)  # the pod is killed mid-download (OOM, node lost)
    first.wait()
    repo.slow.clear()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert {p.name for p in dest.iterdir()} == set(FILES) | {SOURCE_FILE}
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # the dead one's partial is gone
    assert len(hub.downloads("model-00.safetensors")) == 2


def test_a_dataset_subpath_at_a_pr_revision_is_staged_alone_with_its_commit(tmp_path, hub, monkeypatch):
    """hf://datasets/org/name@refs/pr/1/data: the dataset repository (not a model: a 404 before), the PR's
    commit, only the files under data/; the stage reads DEST/data."""
    files = {"README.md": b"# card", "data/train-00000-of-00002.parquet": b"a" * 100,
             "data/train-00001-of-00002.parquet": b"b" * 50, "extended/train-00000-of-00001.parquet": b"c"}
    repo = hub.add("dataset", "open-r1/OpenR1-Math-220k", files)
    pr_commit = repo.refs["refs/pr/1"] = "1" * 40  # not main's commit (the stand-in shows it main's files)
    uri = "hf://datasets/open-r1/OpenR1-Math-220k@refs/pr/1/data"
    [command] = _init_commands(_sft(uri))
    assert command[3:5] == ["open-r1/OpenR1-Math-220k", "refs/pr/1"]
    assert command[6:] == ["--repo-type", "dataset", "--subpath", "data"]
    ran = subprocess.run(_local(command, tmp_path / "staging"), env=_env(hub, tmp_path), capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    dest = tmp_path / "staging" / staged_name(uri)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        SOURCE_FILE, "data", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert (dest / "data/train-00000-of-00002.parquet").read_bytes() == files["data/train-00000-of-00002.parquet"]
    source = json.loads((dest / SOURCE_FILE).read_text())
    assert source | {"stagedAt": None} == {
        "uri": uri, "repoType": "dataset", "repo": "open-r1/OpenR1-Math-220k", "revision": "refs/pr/1",
        "subpath": "data", "commit": pr_commit, "stagedAt": None}
    assert hub.requests[0] == ("GET", "/api/datasets/open-r1/OpenR1-Math-220k/revision/refs%2Fpr%2F1")
    assert all(p.startswith(("/api/datasets/", "/datasets/")) for _, p in hub.requests)  # never as a model
    assert sorted(hub.downloads()) == [f"/datasets/open-r1/OpenR1-Math-220k/resolve/{pr_commit}/{name}"
                                       for name in sorted(files) if name.startswith("data/")]
    monkeypatch.setenv("BRANCHMERGE_STAGING_ROOT", str(tmp_path / "staging"))
    assert local_path(uri) == dest / "data"


# (what the hub holds, token the pod has, URI) -> exit code, fragments of the termination message
FAILURES = [
    ("gated", None, "hf://datasets/org/gated", 2, ["HTTP 401 GatedRepoError", "Access to dataset org/gated is "
                                                   "restricted", "hf-token-secret"]),
    ("gated", "hf_not_granted", "hf://datasets/org/gated", 2, ["HTTP 403 GatedRepoError",
                                                               "not in the authorized list"]),
    ("private", None, "hf://org/private", 2, ["HTTP 401 RepositoryNotFoundError: Repository not found"]),
    ("none", TOKEN, "hf://datasets/org/missing", 2, ["HTTP 404 RepositoryNotFoundError: Repository not found"]),
    ("public", None, "hf://datasets/org/public@v9", 2, ["HTTP 404 RevisionNotFoundError", "Invalid rev id: v9"]),
    ("public", None, "hf://datasets/org/public/nowhere", 2, ["SubpathNotFound", "'nowhere'"]),
    ("down", None, "hf://datasets/org/down", 3, ["HTTP 500 HfHubHTTPError", "Internal Error"]),
]


@pytest.mark.parametrize("holds,token,uri,code,fragments", FAILURES, ids=[f[2] + f"-{f[3]}" for f in FAILURES])
def test_failures_are_classed_as_the_hub_answers_with_its_words_in_the_condition(
        tmp_path, hub, holds, token, uri, code, fragments):
    files = {"data/a.jsonl": b'{"prompt": "p", "response": "r"}\n'}
    hub.add("dataset", "org/gated", files, token=TOKEN, gated=True)
    hub.add("model", "org/private", files, token=TOKEN)
    hub.add("dataset", "org/public", files)
    hub.add("dataset", "org/down", files, fail_status=500)
    [command] = _init_commands(_sft(uri) if "datasets/" in uri else _merge(uri, uri))
    ran = subprocess.run(_local(command, tmp_path / "staging"), env=_env(hub, tmp_path, token=token),
                         capture_output=True, text=True, timeout=120)
    message = (tmp_path / "termination-log").read_text()
    assert ran.returncode == code, ran.stdout + ran.stderr
    assert "\n" not in message and len(message) <= 300 and message.startswith(f"staging {uri} failed: ")
    assert all(f in message for f in fragments), message
    assert token is None or token not in message + ran.stdout + ran.stderr  # the token never printed
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) == []  # nothing half-staged, no lock
    # what the operator makes of that init container (terminationMessagePolicy FallbackToLogsOnError)
    pod = {"metadata": {"name": "x-1-abc"}, "status": {"phase": "Failed", "initContainerStatuses": [
        {"name": "stage-input-0", "state": {"terminated": {"exitCode": ran.returncode, "message": message}}}]}}
    job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}
    failure = classify_failure(job, [pod])
    assert failure.retryable == (code == 3) and message in failure.message
    assert failure.reason == ("InitFailed" if code == 3 else "InvalidSpec")


def test_an_unreachable_hub_is_retried(tmp_path, hub):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    [command] = _init_commands(_merge("hf://org/base", "hf://org/base"))
    ran = subprocess.run(_local(command, tmp_path / "staging"), env=_env(hub, tmp_path, HF_ENDPOINT=closed),
                         capture_output=True, text=True, timeout=120)
    message = (tmp_path / "termination-log").read_text()
    assert ran.returncode == 3 and message.startswith("staging hf://org/base failed: ConnectError"), message


def test_a_private_repository_with_its_token_stages(tmp_path, hub):
    repo = hub.add("model", "org/private", FILES, token=TOKEN)
    [command] = _init_commands(_merge("hf://org/private", "hf://org/private"))
    ran = subprocess.run(_local(command, tmp_path / "staging"), env=_env(hub, tmp_path, token=TOKEN),
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and repo.commit in ran.stdout and TOKEN not in ran.stdout + ran.stderr


def _model_files(folder: Path, seed: int) -> dict[str, bytes]:
    """A small raw model's files, as a hub repository holds them."""
    from branchmerge.trainer.tiny import random_tensors, write_model

    shapes = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,), "lm_head.weight": (8, 4)}
    write_model(folder, random_tensors(shapes, seed))
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_the_stage_records_each_inputs_commit_in_its_manifest_and_metrics(tmp_path, hub, monkeypatch):
    from branchmerge.trainer.stage import run_stage

    a = hub.add("model", "org/expert-a", _model_files(tmp_path / "expert-a", 1))
    b = hub.add("model", "org/expert-b", {**_model_files(tmp_path / "expert-b", 2), "original/consolidated.pth": b"p"}, refs={})
    b.refs["v1"] = b.commit
    uris = ["hf://org/expert-a", "hf://org/expert-b@v1"]
    out = tmp_path / "merged"
    doc = _merge(*uris, out=out.as_uri())
    doc["spec"]["models"][1]["allowPatterns"] = ["*.safetensors", "*.json"]  # the stage reads that copy
    for command in _init_commands(doc):
        ran = subprocess.run(_local(command, tmp_path / "staging"), env=_env(hub, tmp_path), capture_output=True,
                             text=True, timeout=120)
        assert ran.returncode == 0, ran.stdout + ran.stderr
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(target(doc, {}, OPTS).resolved))  # what the operator's ConfigMap holds
    monkeypatch.setenv("BRANCHMERGE_STAGING_ROOT", str(tmp_path / "staging"))
    monkeypatch.setenv("BRANCHMERGE_TERMINATION_LOG", str(tmp_path / "stage-termination-log"))
    code = run_stage("merge", spec_file, tmp_path / "result.json")
    result = json.loads((tmp_path / "result.json").read_text())
    assert code == 0, result
    expected = [{"uri": uris[0], "commit": a.commit, "repoType": "model", "repo": "org/expert-a", "revision": None},
                {"uri": uris[1], "allowPatterns": ["*.json", "*.safetensors"], "commit": b.commit, "repoType": "model",
                 "repo": "org/expert-b", "revision": "v1"}]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["inputs"] == expected and result["inputs"] == expected and "model.safetensors" in manifest["files"]
    assert result["metrics"]["inputCommits"] == {uris[0]: a.commit, uris[1]: b.commit}
    # the termination message the operator copies into status.metrics (flattened)
    metrics = json.loads((tmp_path / "stage-termination-log").read_text())["metrics"]
    assert metrics[f"inputCommits.{uris[0]}"] == a.commit and metrics[f"inputCommits.{uris[1]}"] == b.commit


def test_allow_patterns_stage_only_the_matching_files_into_a_copy_of_their_own(tmp_path, hub, monkeypatch):
    """A model repository with a second copy of its weights (original/*.pth, as Meta's and DeepSeek's have):
    allowPatterns download only the safetensors, config and tokenizer; a dataset's patterns are relative to the
    URI's path; the record, the stage's path and the manifest's inputs name the patterns."""
    from branchmerge.trainer.staging import staged_sources

    model_files = {**FILES, "config.json": b"{}", "tokenizer.json": b"{}", "README.md": b"# card",
                   "original/consolidated.00.pth": b"p" * 5000}
    model = hub.add("model", "org/big", model_files)
    data_files = {"data/train-00000-of-00001.parquet": b"t", "data/test-00000-of-00001.parquet": b"e",
                  "extended/train-00000-of-00001.parquet": b"x"}
    dataset = hub.add("dataset", "org/d", data_files)
    weights = ["*.safetensors", "*.json", "tokenizer*"]
    refs = [("hf://org/big@main", weights), ("hf://datasets/org/d/data", ["train-*"])]
    doc = _cr("Merge", {"method": "linear", "output": {"uri": "pvc://out/m"},
                        "models": [{"uri": uri, "allowPatterns": patterns} for uri, patterns in refs]})
    commands = _init_commands(doc)
    assert len(commands) == 2
    for command in commands:
        ran = subprocess.run(_local(command, tmp_path / "staging"), env=_env(hub, tmp_path), capture_output=True,
                             text=True, timeout=120)
        assert ran.returncode == 0, ran.stdout + ran.stderr
    expected = {"org/big": sorted(n for n in model_files if n.endswith((".safetensors", ".json"))),
                "org/d": ["data/train-00000-of-00001.parquet"]}
    for (uri, patterns), repo in zip(refs, ("org/big", "org/d")):
        dest = tmp_path / "staging" / staged_name(uri, patterns)
        assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(
            expected[repo] + [SOURCE_FILE])
        assert json.loads((dest / SOURCE_FILE).read_text())["allowPatterns"] == sorted(patterns)
        monkeypatch.setenv("BRANCHMERGE_STAGING_ROOT", str(tmp_path / "staging"))
        assert local_path(uri, patterns) == dest / parse_hf_uri(uri).subpath
        assert not (tmp_path / "staging" / staged_name(uri)).exists()  # the whole repository is not there
    assert sorted(hub.downloads()) == sorted(
        [f"/org/big/resolve/{model.commit}/{n}" for n in expected["org/big"]]
        + [f"/datasets/org/d/resolve/{dataset.commit}/{n}" for n in expected["org/d"]])
    sources = staged_sources(target(doc, {}, OPTS).resolved["spec"])
    assert [(s["uri"], s["allowPatterns"], s["commit"]) for s in sources] == [
        ("hf://org/big@main", sorted(weights), model.commit), ("hf://datasets/org/d/data", ["train-*"], dataset.commit)]


@pytest.mark.parametrize("uri,patterns", [("hf://org/big", ["*.gguf"]), ("hf://org/big/original", ["*.json"])])
def test_patterns_that_match_nothing_fail_for_good_and_stage_nothing(tmp_path, hub, uri, patterns):
    hub.add("model", "org/big", {**FILES, "config.json": b"{}", "original/consolidated.00.pth": b"p"})
    [command] = _init_commands(_cr("Merge", {"method": "linear", "output": {"uri": "pvc://out/m"},
                                             "models": [{"uri": uri, "allowPatterns": patterns}]}))
    ran = subprocess.run(_local(command, tmp_path / "staging"), env=_env(hub, tmp_path), capture_output=True,
                         text=True, timeout=120)
    message = (tmp_path / "termination-log").read_text()
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert message.startswith(f"staging {uri} failed: NothingMatched: no file") and str(patterns) in message
    assert list((tmp_path / "staging").iterdir()) == []
