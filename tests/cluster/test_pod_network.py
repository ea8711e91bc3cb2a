"""A stage with the RDMA settings (an extended resource, a Multus annotation, IPC_LOCK, a pull secret) runs
through the operator on the stand-in cluster: the API server admits its pod against a ResourceQuota that
counts the extended resource, the scheduler places it on the node that advertises it (without it the pod
would stay Pending: Insufficient rdma/ib), and the kubelet runs it to success (IPC_LOCK added back to the
stage container's bounding set: tests/testcluster/test_sandbox.py)."""
from __future__ import annotations

from testcluster.cluster import TRAINER_CPU_IMAGE, Cluster

from .helpers import NEEDS_IMAGES, diagnose
from .test_fault_soak import _merge, _models

pytestmark = NEEDS_IMAGES

NS = "soak"  # _merge's models live on the claim "soak"
MULTUS = "k8s.v1.cni.cncf.io/networks"


def test_rdma_stage_is_admitted_scheduled_and_run(tmp_path):
    merge = _merge("rdma", "linear", [{"uri": "pvc://soak/models/a"}, {"uri": "pvc://soak/models/b"}])
    merge["spec"]["resources"] = {"cpu": "1", "extraResources": {"rdma/ib": "1"}, "podAnnotations": {MULTUS: "ib-net"},
                                  "ipcLock": True, "imagePullSecrets": ["registry"]}
    with Cluster(tmp_path / "cluster", node_capacity={"rdma/ib": "1"}) as cluster:
        cluster.namespace(NS)
        _models(cluster.pvc(NS, "soak"))
        cluster.api.call("POST", f"/api/v1/namespaces/{NS}/resourcequotas", {
            "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "rdma"},
            "spec": {"hard": {"requests.rdma/ib": "1"}}})  # a pod asking for more would be refused
        cluster.operator(NS, "--image", TRAINER_CPU_IMAGE, "--default-output-root", "pvc://soak/outputs")
        cluster.api.create(merge, NS)
        try:
            cluster.wait(lambda: ((cluster.api.get("Merge", NS, "rdma") or {}).get("status") or {}).get("phase")
                         in ("Succeeded", "Failed"), 120, "the Merge to finish")
            assert cluster.api.get("Merge", NS, "rdma")["status"]["phase"] == "Succeeded"
        except AssertionError:
            raise AssertionError(diagnose(cluster, NS, [merge]))
        (pod,) = cluster.api.list("Pod", NS)
        (main,) = pod["spec"]["containers"]
        assert main["resources"]["requests"]["rdma/ib"] == main["resources"]["limits"]["rdma/ib"] == "1"
        assert main["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        assert pod["metadata"]["annotations"][MULTUS] == "ib-net"
        assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}]
