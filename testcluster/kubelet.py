"""The node stand-in: one Node object, the cluster's scheduler (testcluster.scheduler) and a kubelet that
runs each pod bound to the node for real, as local processes (testcluster.sandbox) in the Python
environment of the pod's image (testcluster.images).

``Node(url, root, ...)`` runs in its own thread and event loop (``start``/``stop``, or a context manager)
and talks to the API server only over HTTP (testcluster.client). It registers its Node object (capacity
cpu 2, memory 24Gi, pods 110 unless told otherwise; NodeLost/``recover()`` flip it NotReady and back),
runs the scheduler unless ``scheduler=False`` (only one node of a cluster should), and hands each pod
bound to it to a pod worker (testcluster.podworker; probes in testcluster.probes, cluster DNS records in
testcluster.clusterdns). The node has a pod network (testcluster.podnet: a bridge with the gateway of its
pod CIDR, ``network=`` or made on start from ``pod_cidr``, default a free 10.244.<n>.0/24); the node's
InternalIP and every pod's ``hostIP`` is the gateway. For each pod, the kubelet:
- resolves the image (unknown: ``ErrImagePull``, then ``ImagePullBackOff`` with back-off; the pod stays
  Pending), refreshing a built image's project layer once;
- sets up the volumes (testcluster.volumes; a failed mount keeps the pod in ContainerCreating, retried);
- creates the pod sandbox: a network namespace with its own IP on the bridge (``lo`` and ``eth0``), which
  every container of the pod (init, main, restarts, exec probes) joins, and its /etc/hosts, /etc/hostname
  and /etc/resolv.conf; the sandbox is torn down (netns, veth, IP released) when the pod's containers
  are done or the pod is gone, and everything of the network when the node stops;
- runs the init containers in order, then the containers, each with the kubelet's environment (the
  ``kubernetes`` Service variables: ``KUBERNETES_SERVICE_HOST`` = the gateway, where the API server must
  also listen, see ``ApiServer.listen``, and the port of ``url``; ``envFrom``, ``env`` with
  ``valueFrom``; errors: ``CreateContainerConfigError``), ``$(VAR)``-expanded command/args over the image's ENTRYPOINT/CMD, its user (``runAsUser``/``runAsGroup``/
  ``fsGroup``, ``runAsNonRoot`` checks), ``allowPrivilegeEscalation``, dropped and added capabilities (the
  bounding set; a non-root process holds none, as on containerd) and
  ``readOnlyRootFilesystem``, a managed /etc/hosts and /etc/hostname, the termination-message file;
- reports what the kubelet reports: container states (waiting/running/terminated with exit code, reason
  Completed/Error/OOMKilled/StartError, termination message incl. FallbackToLogsOnError), ``lastState``,
  ``restartCount``, ``ready``/``started``, init container statuses, the pod phase, the conditions
  PodReadyToStartContainers, Initialized, ContainersReady, Ready, PodScheduled (and DisruptionTarget),
  ``podIP``/``podIPs`` (the pod's IP), ``hostIP``/``hostIPs`` (the gateway), ``startTime``;
- restarts containers in place for ``OnFailure``/``Always`` with the kubelet's back-off (CrashLoopBackOff);
- probes: exec (a fresh process in the container's mounts, not inside the running container's own
  root overlay, but in the pod's netns), httpGet and tcpSocket from the host to the pod IP; startup,
  readiness and liveness (a failed liveness or startup probe kills the container, which restarts per
  restartPolicy);
- ``activeDeadlineSeconds``: the pod is killed and fails with reason DeadlineExceeded;
- graceful deletion: on ``deletionTimestamp`` SIGTERM to each container's process group, SIGKILL after
  ``deletionGracePeriodSeconds``, the terminal status written, then DELETE with gracePeriodSeconds=0;
- logs: one file per container instance under ``<root>/logs``, registered with the API server's log
  endpoint, and readable with ``node.logs(namespace, pod, container)``;
- DNS: each pod's /etc/hosts also carries the cluster DNS records of this node's pods, at their pod IPs
  (testcluster.clusterdns: ``hostname.subdomain[.namespace[.svc[.cluster.local]]]`` of pods behind a
  headless Service, published when ready or with ``publishNotReadyAddresses``; ``<service>[.<namespace>
  [.svc[.cluster.local]]]``), rewritten in place (same inode: running pods see new names at their next
  lookup) as pods and Services change; /etc/resolv.conf has the cluster search path and a nameserver
  nothing answers on (there is no DNS server), so unknown names fail fast;
- Events (testcluster.events, source ``kubelet`` on this node's host, aggregated by count and rate-limited
  so a looping pod cannot flood the store): ``FailedMount`` (Warning) with the MountVolume.SetUp error (e.g.
  ``MountVolume.SetUp failed for volume "cfg" : configmap "settings" not found``) at each retry; for an image
  that cannot be pulled ``Failed`` ``Failed to pull image "<img>": <error>`` and ``Error: ErrImagePull``, then
  ``BackOff`` (Normal, as the kubelet's image manager writes it) ``Back-off pulling image "<img>"`` and
  ``Failed`` ``Error: ImagePullBackOff``; ``Failed`` ``Error: <cause>`` for CreateContainerConfigError (e.g.
  ``Error: secret "creds" not found``) and StartError; ``BackOff`` (Warning) ``Back-off restarting failed
  container <c> in pod <pod>_<ns>(<uid>)``; container events carry ``fieldPath`` ``spec.containers{<c>}``.
  A missing PersistentVolumeClaim never reaches the kubelet: the scheduler reports it (FailedScheduling);
- scripted fates (testcluster.fates): ``node.fates.add(...)``;
- API failures: no failed call wedges a pod. Each call is bounded by ``api_timeout`` (a delayed answer is a
  timeout) and every step is retried with back-off, as the kubelet's next sync would: reading a
  configMap/secret for a volume (the pod stays ContainerCreating) or for env (CreateContainerConfigError),
  status writes (made again in the background until the server has them, as the status manager does; the
  final DELETE waits for the terminal status), the final DELETE, NodeLost's and ``recover()``'s writes.

Not emulated: CPU/memory limits and the OOM killer (only the OOMKilled fate), eviction under real
pressure, kube-proxy (no Service ClusterIPs or port -> targetPort translation: a Service name resolves
to one endpoint pod), NetworkPolicy, hostNetwork/hostPort (every pod gets its own netns), traffic to
other nodes or off the machine (no NAT, no forwarding), a real DNS server and ``dnsConfig`` (dnsPolicy
Default keeps the host's resolv.conf, any other policy gets the cluster one), image pulls and imagePullPolicy, lifecycle hooks (postStart/preStop), sidecar init containers (``restartPolicy:
Always`` on an init container runs it like any init container), ephemeral containers, the node lease
and heartbeats, the kubelet's Normal lifecycle events (Pulling, Pulled, Created, Started, Killing) and
those of the fates (Evicted, OOMKilling, Preempted), static pods, the kubelet API (exec/attach/port-forward), pod-level
termination-message budget (12 KiB), grpc probes (they fail), ``terminationGracePeriodSeconds`` on probes.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from . import clusterdns
from . import images as imagelib
from .client import TRANSPORT_ERRORS, ApiError, Client, Informer
from .events import EventRecorder
from .fates import SCHEDULING, Fates
from .podspec import condition, hosts_file, now
from .podnet import PodNetwork
from .podworker import TERMINAL, Container, PodWorker
from .scheduler import Scheduler

log = logging.getLogger("testcluster.kubelet")
GPU_MESSAGE = ("0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available: "
               "1 No preemption victims found for incoming pod.")


class Node:
    """A node of the test cluster: registers ``name``, schedules (``scheduler=True``) and runs its pods.

    ``images``: image reference (or repository, any tag) -> an image env folder (Path), another image
    reference or images/ name to use instead (e.g. {"ghcr.io/branchmerge/trainer": "trainer-cpu"}), or None
    (not pullable). Built images/ envs and ``testcluster/python:3.11`` resolve by default.

    ``network``: the node's pod network (testcluster.podnet), e.g. made first so that the API server can
    listen on its gateway; the caller closes it, the node removes its pods' sandboxes on stop. Without
    it the node makes one on start (``pod_cidr``, default a free /24) and closes it on stop."""

    def __init__(self, url: str, root: str | Path, *, name: str = "node-1", images: dict | None = None,
                 capacity: dict | None = None, labels: dict | None = None, taints: list[dict] | None = None,
                 scheduler: bool = True, restart_backoff: tuple[float, float] = (10.0, 300.0),
                 pull_backoff: tuple[float, float] = (10.0, 300.0), retry_seconds: float = 1.0,
                 network: PodNetwork | None = None, pod_cidr: str | None = None, api_timeout: float = 30.0):
        self.url = url
        self.root = Path(root)
        self.name = name
        self.image_map = dict(images or {})
        self.capacity = {"cpu": "2", "memory": "24Gi", "pods": "110", **(capacity or {})}
        self.labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                       **(labels or {})}
        self.taints = list(taints or [])
        self.run_scheduler = scheduler
        self.restart_backoff = restart_backoff
        self.pull_backoff = pull_backoff
        self.retry_seconds = retry_seconds
        self.api_timeout = api_timeout  # bounds each API call (a delayed answer is a timeout, then retried)
        self.fates = Fates()
        self.network = network
        self.pod_cidr = pod_cidr
        self._owns_network = network is None
        self.workers: dict[str, PodWorker] = {}
        self.done: set[str] = set()
        self.lost = False
        self.scheduler: Scheduler | None = None
        self.client: Client | None = None
        self.recorder: EventRecorder | None = None
        self.loop = asyncio.new_event_loop()
        self._executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix=f"kubelet-{name}")
        self._thread = threading.Thread(target=self._thread_main, name=f"kubelet-{name}", daemon=True)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._refreshed: set[str] = set()
        self._services: Informer | None = None
        self._pods: Informer | None = None
        self._first_hold: dict[str, float] = {}
        self._held_recorded: set[str] = set()
        self._background: set[asyncio.Task] = set()   # API calls being retried (status, deletes), NodeLost
        self._deleting: dict[str, asyncio.Task] = {}  # uid -> the final DELETE of a pod no worker runs
        self._node_lock = asyncio.Lock()              # NodeLost and recover() write the Node one at a time

    # ---- thread -----------------------------------------------------------------------------------------------

    def start(self) -> "Node":
        self.root.mkdir(parents=True, exist_ok=True)
        if self.network is None:  # also removes what crashed earlier runs left behind (testcluster.podnet)
            self.network = PodNetwork.create(self.name, self.pod_cidr)
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None:
            self.stop()
            raise RuntimeError(f"node {self.name} did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread.is_alive():
            self._thread.join(30)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._close_network()

    def _close_network(self) -> None:
        if self.network is not None:
            if self._owns_network:
                self.network.close()
            else:
                self.network.clear()

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def call(self, coro, timeout: float = 60):
        """Run a coroutine in the node's loop from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _thread_main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as err:  # noqa: BLE001 -- reported by start()
            self._error = err
            self._ready.set()
        finally:
            self.loop.close()

    async def blocking(self, fn, *args):
        return await self.loop.run_in_executor(self._executor, fn, *args)

    def spawn(self, coro) -> asyncio.Task:
        """A task of the node's own (cancelled when the node stops), outliving the pod worker that started it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def persist(self, what: str, call, *, gone: tuple[int, ...] = (404,)):
        """``await call()`` until it succeeds: the kubelet never gives up on an API call, it makes it again at
        its next sync (here: after ``retry_seconds``, doubling up to 10 s). An ApiError with a status in ``gone``
        ends it (None). Each try is bounded by the client's timeout."""
        delay = self.retry_seconds
        while True:
            try:
                return await call()
            except ApiError as err:
                if err.status in gone:
                    return None
                log.debug("%s failed: %s; retrying in %.1fs", what, err, delay)
            except TRANSPORT_ERRORS as err:
                log.debug("%s failed: %r; retrying in %.1fs", what, err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max(10.0, self.retry_seconds))

    async def final_delete(self, namespace: str, name: str, uid: str) -> None:
        """DELETE with gracePeriodSeconds=0 and the pod's uid as precondition, retried until the pod is gone."""
        async def once():
            try:
                return await self.client.delete("v1", "pods", namespace, name, grace_seconds=0,
                                                preconditions={"uid": uid})
            except ApiError as err:
                if err.status != 409:
                    raise
                current = await self.client.get("v1", "pods", namespace, name)
                if current is not None and (current.get("metadata") or {}).get("uid") == uid:
                    raise  # a conflict on our pod: try again
                return None  # the precondition failed: that pod is gone (another one may have its name)
        await self.persist(f"final delete of pod {namespace}/{name}", once)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self.client = Client(self.url, user_agent=f"kubelet/v1.33.0 ({self.name}) testcluster",
                             timeout=self.api_timeout)
        self.recorder = EventRecorder(self.client, "kubelet", host=self.name)
        tasks: list[asyncio.Task] = []
        try:
            await self._register()
            self._pods = Informer(self.client, "v1", "pods", field_selector=f"spec.nodeName={self.name}",
                                  on_event=self._pod_event)
            self._services = Informer(self.client, "v1", "services", on_event=self._dns_event)
            tasks += [asyncio.create_task(self._pods.run()), asyncio.create_task(self._services.run())]
            if self.run_scheduler:
                self.scheduler = Scheduler(self.client, hold=self._hold, retry_seconds=self.retry_seconds)
                tasks.append(asyncio.create_task(self.scheduler.run()))
            async with asyncio.timeout(30):
                await self._pods.synced()
            self._ready.set()
            await self._stop.wait()
        finally:
            for w in list(self.workers.values()):
                w.kill_all()
            pending = tasks + [t for w in self.workers.values() for t in (w.task, w._terminating, *w._helpers) if t]
            pending += list(self._background)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self.recorder.close()
            await self.client.close()
            self._close_network()  # the pods' sandboxes go with the node (stop() repeats it: idempotent)

    # ---- node object -----------------------------------------------------------------------------------------

    def _conditions(self, ready: bool) -> list[dict]:
        t = now()
        if not ready:
            unknown = "Kubelet stopped posting node status."
            return [{"type": k, "status": "Unknown", "reason": "NodeStatusUnknown", "message": unknown,
                     "lastHeartbeatTime": t, "lastTransitionTime": t}
                    for k in ("MemoryPressure", "DiskPressure", "PIDPressure", "Ready")]
        rows = [("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                ("Ready", "True", "KubeletReady", "kubelet is posting ready status")]
        return [{"type": k, "status": s, "reason": r, "message": m, "lastHeartbeatTime": t, "lastTransitionTime": t}
                for k, s, r, m in rows]

    def node_object(self) -> dict:
        status = {"capacity": dict(self.capacity), "allocatable": dict(self.capacity),
                  "conditions": self._conditions(True),
                  "addresses": [{"type": "InternalIP", "address": self.network.gateway},
                                {"type": "Hostname", "address": self.name}],
                  "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                  "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.33.0",
                               "kubeProxyVersion": "v1.33.0", "containerRuntimeVersion": "testcluster://sandbox",
                               "osImage": "testcluster", "kernelVersion": os.uname().release,
                               "machineID": "", "systemUUID": "", "bootID": ""}}
        obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": dict(self.labels)},
               "spec": {}, "status": status}
        if self.taints:
            obj["spec"]["taints"] = list(self.taints)
        return obj

    async def _register(self) -> None:
        obj = self.node_object()
        try:
            await self.client.create("v1", "nodes", None, obj)
        except ApiError as err:
            if err.status != 409:
                raise
            await self.client.patch("v1", "nodes", None, self.name,
                                    {"metadata": {"labels": obj["metadata"]["labels"]},
                                     "spec": {"taints": self.taints or None}})
            await self.client.patch("v1", "nodes", None, self.name, {"status": obj["status"]}, sub="status")

    async def lose(self) -> None:
        """NodeLost: NotReady with the unreachable taints; the taint manager's DisruptionTarget and force
        deletion of every pod on it; their processes killed. Every API call is retried until it is done
        (run it with ``spawn``: a pod worker's own tasks end with its pod, which this kills)."""
        self.lost = True
        workers = list(self.workers.values())
        for w in workers:
            w.kill_all()
            w.disruption = {"reason": "DeletionByTaintManager",
                            "message": "Taint manager: deleting due to NoExecute taint"}
        t = now()
        taints = [*self.taints, {"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule", "timeAdded": t},
                  {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": t}]
        async with self._node_lock:
            await self.persist("NodeLost: node status", lambda: self.client.patch(
                "v1", "nodes", None, self.name, {"status": {"conditions": self._conditions(False)}}, sub="status"))
            await self.persist("NodeLost: node taints", lambda: self.client.patch(
                "v1", "nodes", None, self.name, {"spec": {"taints": taints}}))
        await asyncio.gather(*(self._evict(w) for w in workers))

    async def _evict(self, w: PodWorker) -> None:
        """The taint manager's part: DisruptionTarget on the pod, then its force deletion."""
        status = w.pod.get("status") or {}
        conds = [c for c in status.get("conditions") or [] if c.get("type") != "DisruptionTarget"]
        conds.append(condition("DisruptionTarget", True, w.disruption["reason"], w.disruption["message"]))
        await self.persist(f"NodeLost: DisruptionTarget on {w.namespace}/{w.name}", lambda: self.client.patch(
            "v1", "pods", w.namespace, w.name, {"status": {"conditions": conds}}, sub="status"))
        await self.final_delete(w.namespace, w.name, w.uid)

    def recover(self, timeout: float = 300) -> None:
        """Bring a lost node back: Ready again, its own taints only; pods bound to it run again."""
        async def go():
            async with self._node_lock:
                self.lost = False
                await self.persist("recover: node taints", lambda: self.client.patch(
                    "v1", "nodes", None, self.name, {"spec": {"taints": self.taints or None}}))
                await self.persist("recover: node status", lambda: self.client.patch(
                    "v1", "nodes", None, self.name, {"status": {"conditions": self._conditions(True)}}, sub="status"))
            for pod in list(self._pods.cache.values()):
                await self._pod_event("MODIFIED", pod)
        self.call(go(), timeout)

    # ---- pods --------------------------------------------------------------------------------------------------

    def _hold(self, pod: dict) -> str | None:
        fate = self.fates.decide(pod, SCHEDULING)
        if fate is None:
            return None
        meta = pod.get("metadata") or {}
        key = meta.get("uid")
        first = self._first_hold.setdefault(key, time.monotonic())
        if key not in self._held_recorded:
            self._held_recorded.add(key)
            self.fates.record(fate.name, pod)
        if fate.name == "NeverScheduled":
            return "ignore"
        if fate.after is not None and time.monotonic() - first >= fate.after:
            return None
        return fate.params.get("message") or GPU_MESSAGE

    async def _pod_event(self, type_: str, pod: dict) -> None:
        meta = pod.get("metadata") or {}
        uid = meta.get("uid")
        if type_ == "DELETED":
            worker = self.workers.pop(uid, None)
            if worker is not None:
                worker.kill_all()
            self.done.discard(uid)
            self.refresh_dns()
            # the kubelet removes a deleted pod's folder (emptyDirs, projected files); logs stay for tests
            asyncio.get_running_loop().run_in_executor(self._executor, shutil.rmtree, self.root / "pods" / uid, True)
            return
        worker = self.workers.get(uid)
        if worker is not None:
            worker.update(pod)
            self.refresh_dns()
            return
        if self.lost:
            return
        terminal = (pod.get("status") or {}).get("phase") in TERMINAL
        if uid in self.done or terminal or meta.get("deletionTimestamp"):
            # nothing runs for it here: finish the deletion (in the background: the informer goes on)
            if meta.get("deletionTimestamp") and uid not in self._deleting:
                task = self.spawn(self.final_delete(meta["namespace"], meta["name"], uid))
                self._deleting[uid] = task
                task.add_done_callback(lambda _t, key=uid: self._deleting.pop(key, None))
            return
        worker = PodWorker(self, pod)
        self.workers[uid] = worker
        worker.task = asyncio.create_task(worker.run())

    def worker_done(self, worker: PodWorker) -> None:
        if self.workers.get(worker.uid) is worker:
            del self.workers[worker.uid]
            self.done.add(worker.uid)

    # ---- images ------------------------------------------------------------------------------------------------

    def resolve_image(self, ref: str) -> imagelib.ImageConfig | None:
        for key in (ref, imagelib.repository(ref)):
            if key in self.image_map:
                value = self.image_map[key]
                if value is None:
                    return None
                if isinstance(value, imagelib.ImageConfig):
                    return value
                if isinstance(value, Path):
                    return imagelib.ImageConfig(name=ref, env={"PATH": "/opt/venv/bin:" + imagelib.DEFAULT_PATH,
                                                               "LANG": "C.UTF-8"}, venv=value, venv_mount="/opt/venv")
                if value in imagelib.names():
                    return self._built(value)
                return self.resolve_image(str(value)) if str(value) != ref else None
        if imagelib.repository(ref) == imagelib.repository(imagelib.SYSTEM_PYTHON):
            return imagelib.config(imagelib.SYSTEM_PYTHON)
        name = imagelib.image_name(ref)
        return self._built(name) if name else None

    def _built(self, name: str) -> imagelib.ImageConfig | None:
        if name in imagelib.UNBUILDABLE or not imagelib.is_built(name):
            return None
        return imagelib.config(name)

    async def refresh_image(self, cfg: imagelib.ImageConfig) -> None:
        if cfg.name in imagelib.names() and cfg.name not in self._refreshed:
            await self.blocking(imagelib.refresh, cfg.name)
            self._refreshed.add(cfg.name)

    def image_id(self, ref: str, cfg: imagelib.ImageConfig) -> str:
        stamp = imagelib.image_dir(cfg.name) / "deps.sha256"
        seed = stamp.read_text() if cfg.name in imagelib.names() and stamp.exists() else cfg.name
        return f"{imagelib.repository(ref)}@sha256:{hashlib.sha256(seed.encode()).hexdigest()}"

    # ---- environment, logs, DNS ---------------------------------------------------------------------------------

    def service_env(self) -> dict[str, str]:
        """The ``kubernetes`` Service's variables (the kubelet always sets them): the gateway, where pods
        reach the host, and the API server's port (it must listen there too); plain HTTP."""
        host, port = self.network.gateway, str(urlparse(self.url).port or 80)
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://{host}:{port}",
                f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}", f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
                f"KUBERNETES_PORT_{port}_TCP_PORT": port, f"KUBERNETES_PORT_{port}_TCP_ADDR": host}

    def log_dir(self, worker: PodWorker) -> Path:
        return self.root / "logs" / f"{worker.namespace}_{worker.name}_{worker.uid}"

    async def register_log(self, worker: PodWorker, c: Container) -> None:
        try:
            await self.client.register_log(worker.namespace, worker.name, c.name, c.log_path)
        except (ApiError, *TRANSPORT_ERRORS) as err:
            log.debug("log endpoint not told about %s: %s", c.log_path, err)

    def logs(self, namespace: str, pod: str, container: str | None = None, *, previous: bool = False) -> str:
        """A container's log (the latest instance; ``previous``: the one before), from the node's files."""
        dirs = sorted((self.root / "logs").glob(f"{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime)
        if not dirs:
            raise FileNotFoundError(f"no logs for pod {namespace}/{pod}")
        folder = dirs[-1]
        names = sorted(p.name for p in folder.iterdir())
        name = container or (names[0] if len(names) == 1 else None)
        if name is None:
            raise ValueError(f"a container name must be specified for pod {pod}, choose one of: {names}")
        files = sorted((folder / name).glob("*.log"), key=lambda p: int(p.stem))
        if previous:
            if len(files) < 2:
                raise FileNotFoundError(f'previous terminated container "{name}" in pod "{pod}" not found')
            return files[-2].read_text(errors="replace")
        return files[-1].read_text(errors="replace") if files else ""

    async def _dns_event(self, _type: str, _obj: dict) -> None:
        self.refresh_dns()

    def release_network(self, worker: PodWorker) -> None:
        try:
            self.loop.run_in_executor(self._executor, self.network.remove_pod, worker.uid)
        except RuntimeError:  # the node is stopping: its network is cleared as a whole
            pass

    def _dns_records(self) -> list:
        pods = dict(self._pods.cache if self._pods else {})
        for w in self.workers.values():  # what this kubelet knows before the API server echoes it back
            if w.sandbox_ready and w.ip:
                known = pods.get((w.namespace, w.name), w.pod)
                pods[(w.namespace, w.name)] = {**known, "status": {**(known.get("status") or {}), "podIP": w.ip}}
        return clusterdns.records(self._services.cache if self._services else {}, pods)

    def hosts_for(self, worker: PodWorker, records: list | None = None) -> str:
        recs = self._dns_records() if records is None else records
        return hosts_file(worker.pod, worker.ip or "127.0.0.1", clusterdns.host_lines(recs, worker.namespace))

    def refresh_dns(self) -> None:
        recs = self._dns_records()
        for w in list(self.workers.values()):
            if w.sandbox_ready:
                w.rewrite_hosts(self.hosts_for(w, recs))
