"""Pod-level problems reach the CR, through the operator on the stand-in cluster (whose API server admits
pods against ResourceQuotas, whose Job controller records FailedCreate, whose scheduler and kubelet report
Unschedulable and image pulls as real ones do). Before, a Job has no condition for any of them and the CR
sat at Running/Started forever.

- over quota: the Job cannot create its pod; the CR says QuotaExceeded (with the quota's message) and a
  Warning Event; once the quota is raised the pod is created and the CR succeeds;
- an image that does not exist: ImagePullBackOff, then past the pending deadline the attempt fails for
  good with that reason and its Job is deleted;
- a node selector no node matches: Unschedulable.
"""
from __future__ import annotations

from testcluster.cluster import TRAINER_CPU_IMAGE, Cluster

from .helpers import NEEDS_IMAGES, diagnose
from .test_fault_soak import _merge, _models

pytestmark = NEEDS_IMAGES

NS = "soak"  # _merge's models live on the claim "soak"
QUOTA_NS = "quota"  # the quota applies to every pod of its namespace: a namespace of its own


def _ns(name: str) -> str:
    return QUOTA_NS if name == "quota" else NS


def _ready(cluster: Cluster, name: str) -> dict:
    status = (cluster.api.get("Merge", _ns(name), name) or {}).get("status") or {}
    return {"phase": status.get("phase"), **next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})}


def _events(cluster: Cluster, name: str) -> list[tuple[str, str]]:
    return [(e.get("type"), e.get("reason")) for e in cluster.api.list("Event", _ns(name))
            if (e.get("involvedObject") or {}).get("name") == name and
            (e.get("involvedObject") or {}).get("kind") == "Merge"]


def test_quota_image_pull_and_scheduling_problems_reach_the_cr(tmp_path):
    models = [{"uri": "pvc://soak/models/a"}, {"uri": "pvc://soak/models/b"}]
    quota = _merge("quota", "linear", models)
    quota["spec"]["resources"] = {"cpu": "1", "memory": "1Gi"}
    pull = _merge("pull", "linear", models)
    pull["spec"]["resources"] = {"cpu": "1", "image": "ghcr.io/branchmerge/no-such-image:0.0.0"}
    place = _merge("place", "linear", models)
    place["spec"]["resources"] = {"cpu": "1", "nodeSelector": {"nvidia.com/gpu.product": "H100"}}
    docs = [quota, pull, place]
    with Cluster(tmp_path / "cluster") as cluster:
        for ns in (NS, QUOTA_NS):
            cluster.namespace(ns)
            _models(cluster.pvc(ns, "soak"))
        cluster.api.call("POST", f"/api/v1/namespaces/{QUOTA_NS}/resourcequotas", {
            "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "team"},
            "spec": {"hard": {"requests.cpu": "500m"}}})
        cluster.operator(NS, "-n", QUOTA_NS, "--image", TRAINER_CPU_IMAGE, "--default-output-root",
                         "pvc://soak/outputs", "--pending-deadline", "25", "--pending-recheck", "1")
        for doc in docs:
            cluster.api.create(doc, _ns(doc["metadata"]["name"]))
        try:
            cluster.wait(lambda: _ready(cluster, "quota").get("reason") == "QuotaExceeded", 60, "QuotaExceeded")
            cluster.wait(lambda: _ready(cluster, "pull").get("reason") == "ImagePullBackOff", 60, "ImagePullBackOff")
            cluster.wait(lambda: _ready(cluster, "place").get("reason") == "Unschedulable", 60, "Unschedulable")
            held = {d["metadata"]["name"]: _ready(cluster, d["metadata"]["name"]) for d in docs}

            cluster.api.call("PATCH", f"/api/v1/namespaces/{QUOTA_NS}/resourcequotas/team",
                             {"spec": {"hard": {"requests.cpu": "8"}}}, content_type="application/merge-patch+json")
            cluster.wait(lambda: _ready(cluster, "quota")["phase"] == "Succeeded", 120, "the quota CR to succeed")
            cluster.wait(lambda: _ready(cluster, "pull")["phase"] == "Failed", 90, "the pull CR to give up")
            pull_jobs = [j for j in cluster.api.list("Job", NS)
                         if j["metadata"]["labels"].get("branchmerge.dev/name") == "pull"]
            events = {d["metadata"]["name"]: _events(cluster, d["metadata"]["name"]) for d in docs}
            final = {d["metadata"]["name"]: _ready(cluster, d["metadata"]["name"]) for d in docs}
        except AssertionError as err:
            raise AssertionError(f"{err}\n{diagnose(cluster, NS, docs[1:])}\n{diagnose(cluster, QUOTA_NS, docs[:1])}") from None

    assert held["quota"]["phase"] == "Running" and "exceeded quota: team" in held["quota"]["message"]
    assert "requests.cpu=1" in held["quota"]["message"] and "limited: requests.cpu=500m" in held["quota"]["message"]
    assert "no-such-image" in held["pull"]["message"]
    assert "node affinity/selector" in held["place"]["message"] or "didn't match" in held["place"]["message"], \
        held["place"]
    assert ("Warning", "QuotaExceeded") in events["quota"] and ("Warning", "ImagePullBackOff") in events["pull"]
    assert ("Warning", "Unschedulable") in events["place"]
    assert final["quota"]["phase"] == "Succeeded"
    assert final["pull"]["reason"] == "ImagePullBackOff" and "did not start within 25s" in final["pull"]["message"]
    assert not pull_jobs or all(j["metadata"].get("deletionTimestamp") for j in pull_jobs)
    assert final["place"]["phase"] == "Failed" or final["place"]["reason"] == "Unschedulable"
