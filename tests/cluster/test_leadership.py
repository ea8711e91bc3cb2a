"""Two operator replicas with kopf peering on the stand-in cluster: the one that loses the lead stops acting.

kopf pauses only its watch streams when a peer of higher priority appears; before the fix, the paused
replica's own workers went on: a retry timer set before the pause fired and the paused replica created
the next attempt's Job (and wrote status) from its frozen view, next to the active replica. Here replica
A (priority 100) schedules a retry 12 s ahead, replica B (priority 200) joins and A pauses; B is then
frozen (SIGSTOP, a hung replica that still holds the lead on paper) so that anything written is A's
doing. A must write nothing while B is alive, and take over once B has gone (SIGTERM: kopf removes B from
the peering object), finishing the CR.
"""
from __future__ import annotations

import os
import signal
import time

from testcluster.cluster import TRAINER_CPU_IMAGE, Cluster

from .helpers import NEEDS_IMAGES, diagnose
from .test_fault_soak import _merge, _models

pytestmark = NEEDS_IMAGES

NS = "soak"  # _merge's models live on the claim "soak"


def _peers(cluster: Cluster) -> dict:
    obj = cluster.api.call("GET", f"/apis/kopf.dev/v1/namespaces/{NS}/kopfpeerings/branchmerge") or {}
    return obj.get("status") or {}


def test_a_replica_that_loses_the_lead_stops_acting(tmp_path):
    doc = _merge("m", "linear", [{"uri": "pvc://soak/models/a"}, {"uri": "pvc://soak/models/b"}])
    doc["spec"]["runPolicy"] = {"backoffLimit": 2, "backoffSeconds": 12}
    with Cluster(tmp_path / "cluster") as cluster:
        cluster.namespace(NS)
        _models(cluster.pvc(NS, "soak"))
        cluster.api.call("POST", f"/apis/kopf.dev/v1/namespaces/{NS}/kopfpeerings", {
            "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "branchmerge"}})
        common = ("--image", TRAINER_CPU_IMAGE, "--default-output-root", "pvc://soak/outputs",
                  "--peering", "branchmerge")
        a = cluster.operator(NS, *common, "--priority", "100")
        cluster.wait(lambda: len(_peers(cluster)) == 1, 60, "replica A in the peering object")
        cluster.node.fates.add("branchmerge.dev/kind=Merge", "OOMKilled")  # attempt 1 dies: a retry is due
        cluster.api.create(doc, NS)

        def ready_reason():
            status = (cluster.api.get("Merge", NS, "m") or {}).get("status") or {}
            return next((c["reason"] for c in status.get("conditions", []) if c["type"] == "Ready"), None)

        try:
            cluster.wait(lambda: ready_reason() == "Retrying", 120, "attempt 1 to fail and a retry to be scheduled")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{diagnose(cluster, NS, [doc])}") from None
        retry_set = time.time()
        b = cluster.operator(NS, *common, "--priority", "200")
        cluster.wait(lambda: len(_peers(cluster)) == 2, 60, "replica B in the peering object")
        time.sleep(4)  # A reads the peering object every 2 s and pauses
        os.killpg(b.proc.pid, signal.SIGSTOP)  # B hangs: it keeps the lead on paper (lastseen + 60 s)
        try:
            before = cluster.api.get("Merge", NS, "m")["status"]
            time.sleep(max(0.0, retry_set + 12 + 6 - time.time()))  # A's retry timer has fired by now
            jobs = cluster.api.list("Job", NS)
            after = cluster.api.get("Merge", NS, "m")["status"]
            assert len(jobs) == 1, f"the paused replica created {[j['metadata']['name'] for j in jobs]}"
            assert after == before, "the paused replica wrote status"
            assert "reconciles paused" in a.tail(20000), a.tail(3000)
        finally:
            os.killpg(b.proc.pid, signal.SIGCONT)
        b.stop()  # SIGTERM: kopf takes B out of the peering object; A leads again
        try:
            cluster.wait(lambda: ((cluster.api.get("Merge", NS, "m") or {}).get("status") or {}).get("phase")
                         == "Succeeded", 180, "replica A to take over and finish the CR")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{diagnose(cluster, NS, [doc])}") from None
        status = cluster.api.get("Merge", NS, "m")["status"]
        assert status["attempts"] == 2 and len(cluster.api.list("Job", NS)) == 2
