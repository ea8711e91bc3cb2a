"""Suspending a queued run does not fight Kueue, through the operator on the stand-in cluster with its Kueue
stand-in (testcluster/kueue.py: Workloads for queued Jobs, admission, Kueue's ownership of an admitted
Job's ``suspend``, eviction on ``spec.active: false``).

Before, the operator set ``suspend`` on the admitted Job, Kueue unsuspended it again, and the two went on
undoing each other: the Job never stayed suspended. Now the operator deactivates the Workload: Kueue evicts
it and suspends the Job, which stays suspended (its pods gone) until the CR is resumed; then the Workload is
active again, readmitted, and the run finishes. The operator never patches a queued Job's ``suspend``.
"""
from __future__ import annotations

import time

from testcluster.cluster import TRAINER_CPU_IMAGE, Cluster

from .helpers import NEEDS_IMAGES, diagnose
from .test_fault_soak import _merge, _models

pytestmark = NEEDS_IMAGES

NS = "soak"


def _phase(cluster: Cluster) -> str | None:
    return ((cluster.api.get("Merge", NS, "queued") or {}).get("status") or {}).get("phase")


def _workload(cluster: Cluster) -> dict | None:
    found = (cluster.api.call("GET", f"/apis/kueue.x-k8s.io/v1beta1/namespaces/{NS}/workloads") or {}).get("items", [])
    return found[0] if found else None


def _condition(obj: dict | None, ctype: str) -> dict:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions", []) if c["type"] == ctype), {})


def test_suspending_a_queued_run_goes_through_the_workload(tmp_path):
    doc = _merge("queued", "linear", [{"uri": "pvc://soak/models/a"}, {"uri": "pvc://soak/models/b"}])
    doc["spec"]["resources"] = {"cpu": "1", "queueName": "team-a"}
    with Cluster(tmp_path / "cluster", kueue=True) as cluster:
        cluster.namespace(NS)
        _models(cluster.pvc(NS, "soak"))
        # the pod is never scheduled, so the admitted attempt is still in flight when it is suspended
        cluster.node.fates.add("branchmerge.dev/kind=Merge", "NeverScheduled")
        cluster.operator(NS, "--image", TRAINER_CPU_IMAGE, "--default-output-root", "pvc://soak/outputs",
                         "--pending-recheck", "1")
        cluster.api.create(doc, NS)
        try:
            cluster.wait(lambda: _condition(_workload(cluster), "Admitted").get("status") == "True", 60,
                         "Kueue to admit the attempt")
            job_name = cluster.api.list("Job", NS)[0]["metadata"]["name"]
            cluster.wait(lambda: cluster.api.get("Job", NS, job_name)["spec"].get("suspend") is False, 30,
                         "the admitted Job to be unsuspended")
            cluster.api.call("PATCH", f"/apis/branchmerge.dev/v1alpha1/namespaces/{NS}/merges/queued",
                             {"spec": {"resources": {"suspend": True}}}, content_type="application/merge-patch+json")
            cluster.wait(lambda: _phase(cluster) == "Suspended", 30, "the CR to be Suspended")
            cluster.wait(lambda: _condition(_workload(cluster), "Evicted").get("reason") == "InactiveWorkload", 30,
                         "Kueue to evict the deactivated Workload")
            # it stays suspended: nobody undoes anybody
            for _ in range(10):
                assert cluster.api.get("Job", NS, job_name)["spec"].get("suspend") is True
                assert _phase(cluster) == "Suspended"
                time.sleep(0.5)
            assert _workload(cluster)["spec"]["active"] is False
            cluster.wait(lambda: not cluster.api.list("Pod", NS), 30, "the suspended Job's pods to go")

            cluster.node.fates.clear()
            cluster.api.call("PATCH", f"/apis/branchmerge.dev/v1alpha1/namespaces/{NS}/merges/queued",
                             {"spec": {"resources": {"suspend": False}}}, content_type="application/merge-patch+json")
            cluster.wait(lambda: _phase(cluster) == "Succeeded", 180, "the resumed run to finish")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{diagnose(cluster, NS, [doc])}") from None
        operator_job_writes = {a for a in cluster.server.core.audit
                               if a[0] == "branchmerge-operator" and a[2] == "batch" and a[1] == "patch"}
        workload = _workload(cluster)
        status = cluster.api.get("Merge", NS, "queued")["status"]
    assert not operator_job_writes, operator_job_writes
    assert workload["spec"]["active"] is True and status["attempts"] == 1
