"""hf:// staging on a shared folder (operator/builders.py's stage-input init containers run
trainer/staging.py): many pods at once download once, the folder only ever appears whole, a dead
downloader's lock and leftovers are taken over, and a missing repository is a permanent failure.

The pods' real command (taken from the Job the operator builds) runs as separate processes on one
folder, as pods do on a ReadWriteMany PVC. ``huggingface_hub`` is replaced by a stand-in package on
PYTHONPATH (no hub here): its ``snapshot_download`` writes a few files slowly into ``local_dir`` and
counts its calls; it does not emulate the hub's cache, resumable downloads or authentication."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from branchmerge.operator.builders import STAGING_ROOT, Run, build_job
from branchmerge.operator.failures import classify_failure
from branchmerge.operator.options import OperatorOptions
from branchmerge.trainer.uris import staged_name

FAKE_HUB = '''
import os, time
from pathlib import Path

class RepositoryNotFoundError(Exception):
    pass

def snapshot_download(repo_id, revision=None, local_dir=None):
    with open(os.environ["FAKE_HUB_CALLS"], "a") as f:
        f.write(f"{repo_id}@{revision}\\n")
    if repo_id.endswith("missing"):
        raise RepositoryNotFoundError(f"404 Client Error: Repository Not Found for url: {repo_id}")
    out = Path(local_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(int(os.environ.get("FAKE_HUB_FILES", "4"))):
        (out / f"model-{i:02d}.safetensors").write_bytes(bytes([i]) * 1000)
        time.sleep(float(os.environ.get("FAKE_HUB_DELAY", "0.2")))
    return str(out)
'''
FILES = {f"model-{i:02d}.safetensors" for i in range(4)}


def _init_command(uri: str) -> list[str]:
    spec = {"method": "linear", "models": [{"uri": uri}, {"uri": uri}], "output": {"uri": "pvc://out/m"}}
    run = Run(kind="Merge", name="m", namespace="ns", uid="u", run_hash="h" * 16,
              resolved={"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge", "metadata": {"name": "m"},
                        "spec": spec})
    pod = build_job(run, 1, OperatorOptions(staging_claim="hf-cache"))["spec"]["template"]["spec"]
    [init] = [c for c in pod["initContainers"] if c["name"].startswith("stage-input")]
    return init["command"]


def _env(tmp_path: Path, **extra) -> dict:
    hub = tmp_path / "fakehub" / "huggingface_hub"
    hub.mkdir(parents=True, exist_ok=True)
    (hub / "__init__.py").write_text(FAKE_HUB)
    return {**os.environ, "PYTHONPATH": str(tmp_path / "fakehub"), "FAKE_HUB_CALLS": str(tmp_path / "calls"),
            "BRANCHMERGE_STAGING_POLL_SECONDS": "0.05", **extra}


def _local(command: list[str], root: Path) -> list[str]:
    """The pod's command for this machine: its interpreter, the staging mount at ``root``."""
    assert command[:3] == ["python", "-m", "branchmerge.trainer.staging"], command
    dest = command[-1]
    assert dest.startswith(STAGING_ROOT + "/")
    return [sys.executable, *command[1:-1], str(root / dest[len(STAGING_ROOT) + 1:])]


def test_many_pods_stage_once_and_never_show_a_partial_copy(tmp_path):
    uri = "hf://org/base@main"
    command = _local(_init_command(uri), tmp_path / "staging")
    dest = tmp_path / "staging" / staged_name(uri)
    seen_partial: list[set] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if dest.is_dir():
                names = {p.name for p in dest.iterdir()}
                if names != FILES:
                    seen_partial.append(names)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        procs = [subprocess.Popen(command, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(5)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        stop.set()
        watcher.join()
    assert [p.returncode for p in procs] == [0] * 5, outs
    assert (tmp_path / "calls").read_text().splitlines() == ["org/base@main"]  # one download for five pods
    assert sum("already staged" in o for o in outs) == 4
    assert {p.name for p in dest.iterdir()} == FILES and not seen_partial
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no lock, no partial folder left


def test_a_dead_downloaders_lock_and_leftovers_are_taken_over(tmp_path):
    uri = "hf://org/base"
    command = _local(_init_command(uri), tmp_path / "staging")
    dest = tmp_path / "staging" / staged_name(uri)
    env = _env(tmp_path, FAKE_HUB_DELAY="30", BRANCHMERGE_STAGING_STALE_SECONDS="1",
               BRANCHMERGE_STAGING_HEARTBEAT_SECONDS="0.2")
    first = subprocess.Popen(command, env=env, start_new_session=True)
    deadline = time.time() + 60
    while not list(dest.parent.glob(dest.name + ".partial-*/model-00.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the lock is fresh (heartbeat) while the holder lives: nobody takes it over
    assert dest.with_name(dest.name + ".lock").is_dir()
    os.killpg(first.pid, signal.SIGKILL)  # the pod is killed mid-download (OOM, node lost)
    first.wait()
    second = subprocess.run(command, env={**env, "FAKE_HUB_DELAY": "0"}, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert {p.name for p in dest.iterdir()} == FILES
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # the dead one's partial is gone
    assert len((tmp_path / "calls").read_text().splitlines()) == 2


def test_a_missing_repository_is_a_permanent_failure(tmp_path):
    command = _local(_init_command("hf://org/missing"), tmp_path / "staging")
    ran = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "RepositoryNotFoundError" in ran.stderr
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) == []
    # what the operator makes of that init container's exit (FallbackToLogsOnError: its log is the message)
    pod = {"metadata": {"name": "m-1-abc"}, "status": {"phase": "Failed", "initContainerStatuses": [
        {"name": "stage-input-0", "state": {"terminated": {"exitCode": 2, "message": ran.stderr}}}]}}
    job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}
    failure = classify_failure(job, [pod])
    assert not failure.retryable and failure.reason == "InvalidSpec" and "Repository Not Found" in failure.message
