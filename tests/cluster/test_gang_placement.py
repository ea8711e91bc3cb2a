"""A partially placed gang, through the operator on the stand-in cluster (no Kueue: the default scheduler
places pods one at a time, so a multi-pod attempt can get some pods and not others).

A 2-pod BranchSFT whose rank 1 cannot be scheduled (the node stand-in's Unschedulable fate, with the
scheduler's message for a missing GPU): rank 0 starts and its torchrun waits in the rendezvous for a peer
that never comes. Before, the operator stopped looking at the attempt's pods once one of them was ready, so
the CR said Running until the rendezvous timed out; now it says Unschedulable (1 of 2 pods running, and why
the other cannot start) and, past the pending deadline, fails for good with that reason, its Job deleted.
"""
from __future__ import annotations

import shutil

from testcluster.cluster import TRAINER_CPU_IMAGE, Cluster

from .helpers import NEEDS_IMAGES, diagnose, on_claim
from .test_multipod import _inputs, _manifest

pytestmark = NEEDS_IMAGES

NS = "multi"
DEADLINE = 30  # rank 0 must be running well before it, even on a busy 2-core machine


def _ready(cluster: Cluster) -> dict:
    status = (cluster.api.get("BranchSFT", NS, "two-ranks") or {}).get("status") or {}
    return {"phase": status.get("phase"), **next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})}


def _rank(index: str):
    return lambda pod: (pod["metadata"].get("annotations") or {}).get("batch.kubernetes.io/job-completion-index") \
        == index and (pod["metadata"].get("labels") or {}).get("branchmerge.dev/name") == "two-ranks"


def _running_pods(cluster: Cluster) -> list[str]:
    return [p["metadata"]["name"] for p in cluster.api.list("Pod", NS)
            if (p.get("status") or {}).get("phase") == "Running"]


def test_a_gang_with_an_unschedulable_pod_is_reported_and_fails_at_the_deadline(tmp_path):
    local = tmp_path / "local"
    _inputs(local)
    [doc] = on_claim([_manifest(local)], local, "data", cpu="1")
    with Cluster(tmp_path / "cluster") as cluster:
        cluster.namespace(NS)
        claim = cluster.pvc(NS, "data")
        for sub in ("models", "data"):
            shutil.copytree(local / sub, claim / sub)
        cluster.node.fates.add(_rank("1"), "Unschedulable", after=None)
        cluster.operator(NS, "--image", TRAINER_CPU_IMAGE, "--default-output-root", "pvc://data/outputs",
                         "--pending-recheck", "1", "--pending-deadline", str(DEADLINE))
        cluster.api.create(doc, NS)
        try:
            cluster.wait(lambda: "1 of 2 pods running" in _ready(cluster).get("message", ""), 90,
                         "the CR to report the partial gang")
            held = _ready(cluster)
            running = _running_pods(cluster)
            cluster.wait(lambda: _ready(cluster)["phase"] == "Failed", 90, "the attempt to fail at the deadline")
            failed = _ready(cluster)
            live_jobs = lambda: [j for j in cluster.api.list("Job", NS)  # noqa: E731
                                 if not j["metadata"].get("deletionTimestamp")]
            cluster.wait(lambda: not live_jobs(), 30, "the attempt's Job to be deleted")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{diagnose(cluster, NS, [doc])}") from None

    assert len(running) == 1 and "-0-" in running[0], running  # rank 0 ran, waiting for its peer
    assert held["phase"] == "Running" and held["reason"] == "Unschedulable", held
    assert "Insufficient nvidia.com/gpu" in held["message"], held
    assert failed["reason"] == "Unschedulable", failed
    assert f"did not start within {DEADLINE}s: 1 of 2 pods running, the rest cannot start: pod two-ranks-" \
        in failed["message"], failed
