"""status.cost end to end on the stand-in cluster: the Merge pod runs the real stage, its termination
message carries the stage's own measurement, the operator adds the pod's run time (container startedAt /
finishedAt) and writes status.cost through the API server's schema."""
from __future__ import annotations

import json

import pytest

from branchmerge.api.timefmt import parse_time
from testcluster.cluster import TRAINER_CPU_IMAGE, Cluster

from .helpers import NEEDS_IMAGES
from .test_fault_soak import _models

pytestmark = [*NEEDS_IMAGES, pytest.mark.timeout(600)]
NS = "cost"


def test_a_merge_pod_cost_reaches_the_status(tmp_path):
    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge", "metadata": {"name": "m"},
           "spec": {"method": "linear", "models": [{"uri": f"pvc://{NS}/models/a"}, {"uri": f"pvc://{NS}/models/b"}],
                    "runPolicy": {"backoffLimit": 0}, "resources": {"cpu": "1"}}}
    with Cluster(tmp_path / "cluster") as cluster:
        cluster.namespace(NS)
        _models(cluster.pvc(NS, NS))
        cluster.operator(NS, "--image", TRAINER_CPU_IMAGE, "--default-output-root", f"pvc://{NS}/outputs")
        cluster.api.create(doc, NS)
        cluster.wait(lambda: ((cluster.api.get("Merge", NS, "m") or {}).get("status") or {}).get("phase")
                     in ("Succeeded", "Failed"), 300, "the Merge to finish")
        status = cluster.api.get("Merge", NS, "m")["status"]
        [pod] = cluster.api.list("Pod", NS)
    assert status["phase"] == "Succeeded", status
    term = next(c for c in pod["status"]["containerStatuses"] if c["name"] == "stage")["state"]["terminated"]
    reported = json.loads(term["message"])["cost"]  # what the stage measured of its own process tree
    assert set(reported) == {"wallSeconds", "cpuSeconds", "peakMemoryBytes", "gpus", "gpuSeconds"}
    assert reported["cpuSeconds"] > 0.1 and reported["peakMemoryBytes"] > 50 * 2**20 and reported["gpus"] == 0
    wall = parse_time(term["finishedAt"]) - parse_time(term["startedAt"])  # the kubelet's clock, 1 s resolution
    assert status["cost"] == {"wallSeconds": wall, "cpuSeconds": reported["cpuSeconds"],
                              "peakMemoryBytes": reported["peakMemoryBytes"], "gpus": 0, "gpuSeconds": 0.0,
                              "attempts": 1}
    assert reported["wallSeconds"] <= wall + 1.0
