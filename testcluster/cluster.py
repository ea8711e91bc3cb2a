"""The whole stand-in cluster in one object, for the end-to-end tests and bench/operator.py: the API
server, the Job and TTL-after-finished controllers, one node (scheduler + kubelet running pods as local
processes in their images' environments) and the branchmerge operator as a process of its own image.

    with Cluster(tmp_path) as cluster:
        cluster.namespace("ns"); claim = cluster.pvc("ns", "data")     # claim: the PVC's folder on the node
        op = cluster.operator("ns", "--image", TRAINER_CPU)            # `branchmerge operator` in the operator image env
        cluster.api.create(cr, "ns")

Not emulated: the operator's Deployment (the process is started, killed and restarted by the test, as
a Deployment's ReplicaSet would recreate its pod; it logs in with a kubeconfig, not a service account
token: the stand-in serves plain HTTP), more than one node, kube-proxy and a cluster DNS server (a pod
resolves its own and its Service peers' names, at their pod IPs, through the per-pod /etc/hosts the
kubelet writes).

Networking: the node's pod network (testcluster.podnet: a bridge, one network namespace and IP per pod)
is made first, so that the API server listens on its gateway too (pods reach it at
KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT) besides 127.0.0.1 (the tests and the operator process,
which runs on the host); ``cluster.network`` is it, closed with the cluster.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from branchmerge.operator.emulator import Api

from . import images
from .apiserver import ApiServer
from .jobcontroller import JobController
from .kueue import KueueController
from .ttl import TTLController
from .wait import wait_for
from .kubelet import Node
from .podnet import PodNetwork

REPO = Path(__file__).resolve().parent.parent
OPERATOR_IMAGE = "ghcr.io/branchmerge/operator:0.1.0"
TRAINER_CPU_IMAGE = "ghcr.io/branchmerge/trainer-cpu:0.1.0"


class OperatorProcess:
    """``branchmerge operator`` as its image runs it: the operator image's environment and ENV, its
    entry point, a kubeconfig for the stand-in. ``kill()`` is a crash (SIGKILL), ``stop()`` a SIGTERM."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, args: tuple[str, ...] = ()):
        self.config = images.config(OPERATOR_IMAGE)
        self.argv = self.config.argv(None, ["operator", "-n", namespace, "--kubeconfig", str(kubeconfig),
                                            "--metrics-port", "0", "--liveness", "", *args])
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def _env(self) -> dict[str, str]:
        env = dict(self.config.env)
        venv_bin = str(self.config.venv / "bin")
        # the image has its env at /opt/venv (on PATH); here it is the built folder
        env["PATH"] = ":".join(venv_bin if p == f"{self.config.venv_mount}/bin" else p
                               for p in env.get("PATH", "").split(":"))
        env["HOME"] = str(self.log.parent)
        return env

    def start(self) -> "OperatorProcess":
        images.refresh("operator")
        exe, *rest = self.argv
        path = self._env()["PATH"]
        found = next((Path(d) / exe for d in path.split(":") if (Path(d) / exe).exists()), None)
        if found is None:
            raise RuntimeError(f"{exe} is not in the operator image env ({self.config.venv}): run "
                               "`python -m testcluster.images build --only operator`")
        self.proc = subprocess.Popen([str(found), *rest], env=self._env(), stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "a"), start_new_session=True)
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, grace: float = 20.0) -> None:
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Cluster:
    """API server + Job/TTL controllers + one node, each in its own thread, all talking HTTP.

    ``images``: the node's image map (e.g. route the CUDA trainer image to trainer-cpu). ``job_backoff``:
    the Job controller's pod backoff base (10 s on a real cluster; the operator's Jobs use backoffLimit 0,
    so it only matters for Jobs that retry pods themselves). ``kueue``: also run the Kueue stand-in
    (testcluster.kueue: the Workload CRD, Workloads for Jobs labelled ``kueue.x-k8s.io/queue-name``,
    admission, ``spec.active``), as ``cluster.kueue``; ``kueue_quota``: its ClusterQueue's quota (e.g.
    ``{"cpu": 4, "memory": "16Gi", "nvidia.com/gpu": 32}``; implies ``kueue``; None: every Workload is
    admitted at once)."""

    def __init__(self, root: Path, *, gc: str = "background", images: dict | None = None,
                 job_backoff: float = 10.0, node_capacity: dict | None = None, kueue: bool = False,
                 kueue_quota: dict | None = None):
        self.root = Path(root)
        self.server = ApiServer(REPO / "crds", gc=gc)
        self.image_map = images
        self.job_backoff = job_backoff
        self.node_capacity = node_capacity
        self.jobs: JobController | None = None
        self.ttl: TTLController | None = None
        self.with_kueue = kueue or kueue_quota is not None
        self.kueue_quota = kueue_quota
        self.kueue: KueueController | None = None
        self.node: Node | None = None
        self.network: PodNetwork | None = None
        self.operators: list[OperatorProcess] = []

    def __enter__(self) -> "Cluster":
        self.root.mkdir(parents=True, exist_ok=True)
        self.network = PodNetwork.create("node-1")
        try:
            self.server.start()
            self.server.listen(self.network.gateway)
            self.api = Api(self.server.url)
            self.kubeconfig = self.server.write_kubeconfig(self.root / "kubeconfig")
            self.jobs = JobController(self.server.url, backoff_base=self.job_backoff).start()
            self.ttl = TTLController(self.server.url).start()
            if self.with_kueue:
                self.kueue = KueueController(self.server.url, quota=self.kueue_quota).start()
            self.node = Node(self.server.url, self.root / "node", images=self.image_map,
                             capacity=self.node_capacity, network=self.network).start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for op in self.operators:
            op.stop()
        for part in (self.node, self.kueue, self.ttl, self.jobs):
            if part is not None:
                part.stop()
        self.server.stop()
        if self.network is not None:
            self.network.close()

    # ---- what a test sets up ------------------------------------------------------------------------------

    def namespace(self, name: str) -> None:
        self.api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": name}})

    def pvc(self, namespace: str, name: str, size: str = "10Gi") -> Path:
        """A bound ReadWriteMany claim; returns its folder on the node (the tests put inputs there)."""
        self.api.call("POST", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}}})
        folder = self.root / "node" / "pvcs" / namespace / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def operator(self, namespace: str, *args: str) -> OperatorProcess:
        op = OperatorProcess(self.kubeconfig, namespace, self.root / f"operator-{len(self.operators)}.log",
                             tuple(args))
        self.operators.append(op.start())
        return op

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.5):
        """Poll ``predicate`` until it returns something truthy; AssertionError naming ``what`` on timeout."""
        return wait_for(predicate, timeout, interval, what)
