"""Multi-pod stages through the operator on the stand-in cluster.

- A 2-pod BranchSFT: an Indexed Job of two pods, each in its own network namespace, torchrun in each
  (PET_* from the operator, node rank from the completion index), the rendezvous at
  ``<job>-0.<service>:29500`` resolved through the headless Service the operator creates, after the
  wait-for-peers init container has seen that name resolve. The trained model must be byte-identical to
  `branchmerge run`'s of the same manifest (2 ranks under torchrun on this machine, gloo both times).
- A 2-worker TeacherGen with 4 shards: an Indexed Job whose worker i of W (RANK/WORLD_SIZE from the
  operator) takes shards i, i + W, ...; no wait-for-peers (the workers share files, not a rendezvous);
  worker 0 publishes once every shard is complete, a dataset byte-identical to the one a single local
  process writes.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from branchmerge.api.outputs import read_manifest
from branchmerge.trainer.tiny import build_tiny_model
from testcluster.cluster import TRAINER_CPU_IMAGE, Cluster

from .helpers import NEEDS_IMAGES, diagnose, on_claim, phases

pytestmark = NEEDS_IMAGES

NS = "multi"


def _inputs(root):
    build_tiny_model(root / "models" / "base")
    records = [{"prompt": f"what is {a} + {b}?", "response": f"<think>{a} + {b} = {a + b}.</think> "
                f"The answer is \\boxed{{{a + b}}}."} for a in range(4) for b in range(4)]
    data = root / "data" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))


def _manifest(root) -> dict:
    return {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "BranchSFT", "metadata": {"name": "two-ranks"},
            "spec": {"base": {"uri": (root / "models" / "base").resolve().as_uri()},
                     "data": [{"uri": (root / "data" / "train.jsonl").resolve().as_uri()}],
                     "training": {"epochs": 1, "learningRate": 2e-3, "globalBatchSize": 4, "microBatchSize": 1,
                                  "maxSeqLen": 256, "packing": "neat", "seed": 7, "precision": "fp32"},
                     "deepspeed": {"zeroStage": 2},
                     "resources": {"nodes": 2},
                     "runPolicy": {"backoffLimit": 0}}}


def _run_locally(local, doc: dict, expect: int = 0) -> None:
    """``branchmerge run`` on ``doc`` alone, with ``local`` as its workdir's parent (the reference)."""
    (local / "manifests").mkdir()
    (local / "manifests" / "stage.yaml").write_text(yaml.safe_dump(doc))
    ran = subprocess.run([sys.executable, "-m", "branchmerge.cli", "run", "-f", str(local / "manifests"),
                          "--workdir", str(local / "work"), "--plain"], capture_output=True, text=True, timeout=600)
    assert ran.returncode == expect, ran.stdout[-3000:] + ran.stderr[-3000:]


@contextlib.contextmanager
def _on_cluster(tmp_path, local, doc: dict):
    """The stand-in cluster with ``local``'s models and data on the claim "data", the operator, ``doc``
    applied (its URIs moved onto the claim); yields (cluster, the claim's folder, the applied doc)."""
    [cluster_doc] = on_claim([doc], local, "data", cpu="1")
    with Cluster(tmp_path / "cluster") as cluster:
        cluster.namespace(NS)
        claim = cluster.pvc(NS, "data")
        for sub in ("models", "data"):
            shutil.copytree(local / sub, claim / sub)
        cluster.operator(NS, "--image", TRAINER_CPU_IMAGE, "--default-output-root", "pvc://data/outputs")
        cluster.api.create(cluster_doc, NS)
        yield cluster, claim, cluster_doc


def _content(files: dict) -> dict:
    return {k: v for k, v in files.items() if not k.startswith("branchmerge_")}


# A local reference run and a two-pod run through the operator, each building DeepSpeed's CPU op.
@pytest.mark.timeout(1800)
def test_two_pod_branchsft_rendezvous_and_matches_branchmerge_run(tmp_path):
    local = tmp_path / "local"
    _inputs(local)
    doc = _manifest(local)
    _run_locally(local, doc)
    reference = read_manifest(local / "work" / "outputs" / "branchsft" / "two-ranks")

    started = time.time()
    with _on_cluster(tmp_path, local, doc) as (cluster, claim, cluster_doc):
        try:
            cluster.wait(lambda: phases(cluster, NS, [cluster_doc])["BranchSFT/two-ranks"] in ("Succeeded", "Failed"),
                         600, "the 2-pod BranchSFT to finish", 1.0)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{diagnose(cluster, NS, [cluster_doc])}") from None
        assert phases(cluster, NS, [cluster_doc])["BranchSFT/two-ranks"] == "Succeeded", \
            diagnose(cluster, NS, [cluster_doc])
        pods = sorted(cluster.api.list("Pod", NS), key=lambda p: p["metadata"]["name"])
        services = cluster.api.list("Service", NS)
        wall = time.time() - started
    # two pods of one Indexed Job, each with its own IP, both through the peer wait and torchrun
    assert len(pods) == 2 and {p["status"]["phase"] for p in pods} == {"Succeeded"}
    assert len({p["status"]["podIP"] for p in pods}) == 2
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
    assert all(p["spec"]["containers"][0]["command"][0] == "torchrun" for p in pods)
    assert [s["spec"]["clusterIP"] for s in services] == ["None"]
    published = read_manifest(claim / "outputs" / NS / "branchsft" / "two-ranks")
    assert _content(published) == _content(reference), "the 2-pod model differs from branchmerge run's"
    print(f"\n2-pod BranchSFT through the operator in {wall:.0f} s; {len(_content(published))} files identical")


def _teachergen(root) -> dict:
    prompts = root / "data" / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "question": f"what is {i} + {i}?"}) + "\n" for i in range(8)))
    return {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "TeacherGen", "metadata": {"name": "two-workers"},
            "spec": {"teacher": {"model": {"uri": (root / "models" / "base").resolve().as_uri()},
                                 "engine": {"name": "transformers", "dtype": "float32"}},
                     "prompts": {"dataset": {"uri": prompts.resolve().as_uri()}, "idField": "id"},
                     "template": "{{question}}",
                     "sampling": {"samplesPerPrompt": 1, "temperature": 0.0, "maxTokens": 12, "seed": 1},
                     "shards": 4,
                     "resources": {"nodes": 2},
                     "runPolicy": {"backoffLimit": 0}}}


def test_two_worker_teachergen_covers_every_shard_and_matches_branchmerge_run(tmp_path):
    """An Indexed Job of 2 workers over 4 shards, two each (with more shards than workers the workers used
    to cover only some of them and wait for the rest for a day: "The data plane at real scale", item 1),
    publishing the dataset one process publishes locally, every prompt generated once."""
    local = tmp_path / "local"
    _inputs(local)
    doc = _teachergen(local)
    _run_locally(local, doc)
    reference = read_manifest(local / "work" / "outputs" / "teachergen" / "two-workers")

    with _on_cluster(tmp_path, local, doc) as (cluster, claim, cluster_doc):
        key = "TeacherGen/two-workers"
        try:
            cluster.wait(lambda: phases(cluster, NS, [cluster_doc])[key] in ("Succeeded", "Failed"), 600,
                         "the 2-worker TeacherGen to finish", 1.0)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{diagnose(cluster, NS, [cluster_doc])}") from None
        assert phases(cluster, NS, [cluster_doc])[key] == "Succeeded", diagnose(cluster, NS, [cluster_doc])
        pods = cluster.api.list("Pod", NS)
        status = cluster.api.get("TeacherGen", NS, "two-workers")["status"]
    assert len(pods) == 2 and {p["status"]["phase"] for p in pods} == {"Succeeded"}
    assert all("wait-for-peers" not in [c["name"] for c in p["spec"].get("initContainers", [])] for p in pods)
    out = claim / "outputs" / NS / "teachergen" / "two-workers"
    published = read_manifest(out)
    assert published["data.jsonl"] == reference["data.jsonl"], "the 2-worker dataset differs from branchmerge run's"
    # every shard ran, every prompt exactly once (the tiny teacher's samples are all truncated: the dataset
    # itself is empty, its counts and the shards' committed batches say what was generated)
    work = out.parent / "two-workers.work"
    assert sorted(p.parent.name for p in work.glob("shard-*/complete.json")) == [f"shard-{s:05d}" for s in range(4)]
    generated = [pid for log in work.glob("shard-*/commits.jsonl") for line in log.read_text().splitlines()
                 for pid in json.loads(line)["prompts"]]
    assert sorted(generated) == sorted(f"p{i}" for i in range(8)), generated
    counts = json.loads((out / "teachergen.json").read_text())["counts"]
    assert counts["promptsDone"] == 8 and counts["samplesGenerated"] == 8 and counts["shards"] == 4, counts
    assert status["metrics"]["promptsDone"] == 8, status["metrics"]


def test_invalid_input_under_torchrun_fails_at_once_in_both_control_planes(tmp_path):
    """Exit 2 (invalid input) is permanent whatever launcher wraps the stage. Under torchrun every rank's exit
    becomes the launcher's 1 (ChildFailedError), which both control planes used to retry up to backoffLimit;
    now the stage's report (result file, termination message) carries its class and one attempt is enough."""
    local = tmp_path / "local"
    _inputs(local)
    (local / "data" / "train.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(8)))
    doc = _manifest(local)
    doc["metadata"]["name"] = "bad-data"
    doc["spec"]["runPolicy"] = {"backoffLimit": 2, "backoffSeconds": 1}
    _run_locally(local, doc, expect=1)
    record = json.loads((local / "work" / "status" / "branchsft" / "bad-data.json").read_text())
    status = record["status"]
    assert status["phase"] == "Failed" and status["attempts"] == 1, status
    assert "missing string field 'response'" in json.dumps(status), status

    with _on_cluster(tmp_path, local, doc) as (cluster, claim, cluster_doc):
        cluster.wait(lambda: phases(cluster, NS, [cluster_doc])["BranchSFT/bad-data"] == "Failed", 300,
                     "the 2-pod BranchSFT with invalid data to fail", 1.0)
        status = cluster.api.get("BranchSFT", NS, "bad-data")["status"]
        jobs = cluster.api.list("Job", NS)

        def terminated():  # the CR fails on the first pod's message; the other pod may still be exiting
            pods = cluster.api.list("Pod", NS)
            return pods if all("terminated" in ((p["status"].get("containerStatuses") or [{}])[0].get("state") or {})
                               for p in pods) else None
        pods = cluster.wait(terminated, 120, "both pods to terminate", 1.0)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec" and status["attempts"] == 1, status
    assert "missing string field 'response'" in ready["message"], ready
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
    # the container itself exited 1 (torchrun's code): the class came from the termination message
    codes = {p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in pods}
    assert codes == {1}, codes
