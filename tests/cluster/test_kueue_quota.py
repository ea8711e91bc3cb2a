"""Queued runs against a ClusterQueue with a quota, through the operator on the stand-in cluster with its Kueue
stand-in (testcluster/kueue.py, ``kueue_quota``: Kueue's accounting, admission while Workloads fit, its
messages for those that do not).

- Two Merges of 1 cpu each on a queue of 1 cpu: Kueue admits the first; the second waits, its CR Pending
  with reason Queued and Kueue's own message ("insufficient unused quota for cpu ..., 1 more needed"), and
  starts once the first has finished and released the quota.
- A 4-node x 8-GPU BranchSFT on a queue of 16 GPUs: Kueue says "request > maximum capacity (32 > 16)", so it
  would wait for ever (before, it sat Queued with no word of why); now the CR fails at once with
  ExceedsQueueCapacity, a Warning Event naming the resource and the numbers, and its Job (with its place in the
  queue) deleted. Its pods never exist: nothing needs a GPU here.
"""
from __future__ import annotations

from testcluster.cluster import TRAINER_CPU_IMAGE, Cluster

from tests.conftest import manifest
from .helpers import NEEDS_IMAGES, diagnose
from .test_fault_soak import _merge, _models

pytestmark = NEEDS_IMAGES

NS = "soak"  # _merge's models live on the claim "soak"
QUOTA = {"cpu": "1", "memory": "1Ti", "nvidia.com/gpu": 16}


def _ready(cluster: Cluster, kind: str, name: str) -> dict:
    status = (cluster.api.get(kind, NS, name) or {}).get("status") or {}
    return {"phase": status.get("phase"), "completionTime": status.get("completionTime"),
            **next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})}


def _events(cluster: Cluster, kind: str, name: str) -> list[tuple[str, str, str]]:
    return [(e.get("type"), e.get("reason"), e.get("message", "")) for e in cluster.api.list("Event", NS)
            if (e.get("involvedObject") or {}).get("name") == name
            and (e.get("involvedObject") or {}).get("kind") == kind]


def _jobs(cluster: Cluster, name: str) -> list[dict]:
    return [j for j in cluster.api.list("Job", NS) if j["metadata"]["labels"].get("branchmerge.dev/name") == name
            and not j["metadata"].get("deletionTimestamp")]


def _big_sft() -> dict:
    return manifest("BranchSFT", "big",
                    {"base": {"uri": "pvc://soak/models/base"}, "data": [{"uri": "pvc://soak/data/train.jsonl"}],
                     "training": {"globalBatchSize": 32, "microBatchSize": 1},
                     "resources": {"nodes": 4, "gpusPerNode": 8, "cpu": "250m", "queueName": "team-a"},
                     "runPolicy": {"backoffLimit": 3}})


def test_queued_runs_wait_for_quota_and_a_gang_too_big_for_the_queue_fails_at_once(tmp_path):
    models = [{"uri": "pvc://soak/models/a"}, {"uri": "pvc://soak/models/b"}]
    first, second = _merge("first", "linear", models), _merge("second", "linear", models)
    for doc in (first, second):
        doc["spec"]["resources"] = {"cpu": "1", "queueName": "team-a"}
    big = _big_sft()
    docs = [first, second, big]
    with Cluster(tmp_path / "cluster", kueue_quota=QUOTA) as cluster:
        cluster.namespace(NS)
        _models(cluster.pvc(NS, "soak"))
        # the first Merge's pod is held a while (admitted, quota taken, not scheduled yet), so the second is
        # surely queued behind it however fast the first would run
        cluster.node.fates.add("branchmerge.dev/name=first", "Unschedulable", after=15)
        cluster.operator(NS, "--image", TRAINER_CPU_IMAGE, "--default-output-root", "pvc://soak/outputs",
                         "--pending-recheck", "1")
        try:
            cluster.api.create(big, NS)
            cluster.api.create(first, NS)
            cluster.wait(lambda: [j for j in _jobs(cluster, "first") if j["spec"].get("suspend") is False], 60,
                         "Kueue to admit the first Merge")
            cluster.api.create(second, NS)
            cluster.wait(lambda: "more needed" in _ready(cluster, "Merge", "second").get("message", ""), 60,
                         "the second Merge to show Kueue's message")
            queued = _ready(cluster, "Merge", "second")
            cluster.wait(lambda: _ready(cluster, "BranchSFT", "big")["phase"] == "Failed", 60,
                         "the oversized BranchSFT to fail")
            failed = _ready(cluster, "BranchSFT", "big")
            cluster.wait(lambda: not _jobs(cluster, "big"), 30, "the oversized run's Job to be deleted")
            cluster.wait(lambda: _ready(cluster, "Merge", "second")["phase"] == "Succeeded", 180,
                         "the second Merge to run once the first released the quota")
            done = {name: _ready(cluster, "Merge", name) for name in ("first", "second")}
            events = _events(cluster, "BranchSFT", "big")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{diagnose(cluster, NS, docs)}") from None

    assert queued["phase"] == "Pending" and queued["reason"] == "Queued", queued
    assert queued["message"] == ("attempt 1 waits for admission by queue team-a: couldn't assign flavors to pod "
                                 "set main: insufficient unused quota for cpu in flavor default-flavor, 1 more needed")
    assert done["first"]["phase"] == "Succeeded" and done["second"]["phase"] == "Succeeded", done
    assert done["second"]["completionTime"] >= done["first"]["completionTime"]

    assert failed["reason"] == "ExceedsQueueCapacity", failed
    assert failed["message"].startswith("attempt 1 can never be admitted by queue team-a: it asks for 32 "
                                        "nvidia.com/gpu, more than its ClusterQueue can ever admit (16 in flavor "
                                        "default-flavor)"), failed
    assert "request > maximum capacity (32 > 16)" in failed["message"]
    assert [e[:2] for e in events if e[1] == "ExceedsQueueCapacity"] == [("Warning", "ExceedsQueueCapacity")]
