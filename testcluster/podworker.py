"""One pod's life on the node (the kubelet's pod worker): volumes, the pod sandbox (its own network
namespace and IP on the node's pod network, testcluster.podnet), init containers in order, then the
containers, each as a sandboxed process in its image's environment; restarts with back-off, probes,
activeDeadlineSeconds, graceful termination, scripted fates; and the pod status the kubelet reports.
``testcluster.kubelet.Node`` owns the workers; what is and is not emulated is listed there.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from . import images as imagelib
from . import probes
from .client import TRANSPORT_ERRORS, ApiError
from .events import NORMAL, WARNING
from .fates import KUBELET
from .podnet import NetworkError
from . import clusterdns
from .podspec import (ConfigError, condition, container_env, expand, hostname, now, pod_phase, referenced, run_as,
                      tail_bytes, termination_message, token_key, token_sources)
from .sandbox import Mount, Spec, StartError
from .sandbox import start as sandbox_start
from .volumes import MountError, PodVolumes

if TYPE_CHECKING:
    from .kubelet import Node

log = logging.getLogger("testcluster.kubelet")
TERMINAL = ("Succeeded", "Failed")
EPOCH = "1970-01-01T00:00:00Z"
EVICTION_MESSAGE = "The node was low on resource: memory."


class FetchError(Exception):
    """A configMap or secret the pod refers to could not be read (not a 404: the API server failed or timed
    out): the step that needed it fails and is retried, as the kubelet's next sync would."""


def _container_id() -> str:
    return "containerd://" + os.urandom(32).hex()


class Container:
    """One container's record: what the kubelet reports about it, and its running process."""

    def __init__(self, spec: dict, init: bool):
        self.spec = spec
        self.name = spec.get("name", "")
        self.init = init
        self.state: dict = {"waiting": {"reason": "PodInitializing" if init else "ContainerCreating"}}
        self.last_state: dict = {}
        self.restart_count = 0
        self.instances = 0
        self.ready = False
        self.started = False
        self.container_id: str | None = None
        self.image_id = ""
        self.proc = None
        self.log_path: str | None = None
        self.term_path: Path | None = None
        self.oom = False
        self.killed_by: str | None = None  # "liveness"/"startup": the probe that killed it
        self.spec_for_probes: Spec | None = None

    def waiting(self, reason: str, message: str | None = None) -> None:
        self.state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        self.ready = False

    def status(self) -> dict:
        out = {"name": self.name, "state": self.state, "lastState": self.last_state, "ready": self.ready,
               "restartCount": self.restart_count, "image": self.spec.get("image", ""), "imageID": self.image_id,
               "started": self.started}
        if self.container_id:
            out["containerID"] = self.container_id
        return out


class PodWorker:
    """Runs one pod to completion (or deletion) and keeps its status current."""

    def __init__(self, node: "Node", pod: dict):
        self.node = node
        self.pod = pod
        meta = pod["metadata"]
        self.uid, self.namespace, self.name = meta["uid"], meta["namespace"], meta["name"]
        spec = pod.get("spec") or {}
        self.restart_policy = spec.get("restartPolicy") or "Always"
        self.inits = [Container(c, True) for c in spec.get("initContainers") or []]
        self.mains = [Container(c, False) for c in spec.get("containers") or []]
        if not self.inits:
            for c in self.mains:
                c.waiting("ContainerCreating")
        else:
            for c in self.inits:
                c.waiting("PodInitializing")
            for c in self.mains:
                c.waiting("PodInitializing")
        self.dir = node.root / "pods" / self.uid
        self.volumes = PodVolumes(pod, self.dir, node.root / "pvcs")
        self.start_time = now()
        self.sandbox_ready = False
        self.ip: str | None = None        # the pod IP (kept in the status after the sandbox is gone)
        self.netns: str | None = None     # its network namespace, /run/netns/<netns>
        self.init_failed = False
        self.stopping = False
        self.evicted = False
        self.deadline_exceeded = False
        self.disruption: dict | None = None
        self.fate = None
        self._pull_failing_since: float | None = None  # the ImagePullBackOff fate's first failed pull
        self.task: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._written: dict | None = None
        self._resync: asyncio.Task | None = None  # retries a status write that failed (the status manager)
        self._running = asyncio.Event()  # a main container has started
        self._helpers: list[asyncio.Task] = []   # fate and deadline timers: cancelled when the pod ends
        self._terminating: asyncio.Task | None = None
        self.hosts_path = self.dir / "etc-hosts"
        self.finished = False

    # ---- events -------------------------------------------------------------------------------------------

    def event(self, type_: str, reason: str, message: str, c: "Container | None" = None) -> None:
        """An Event about this pod (about one of its containers with ``c``), as the kubelet records it."""
        if self.node.recorder is None:
            return
        field_path = None
        if c is not None:
            field_path = f"spec.{'initContainers' if c.init else 'containers'}{{{c.name}}}"
        self.node.recorder.event(self.pod, type_, reason, message, kind="Pod", api_version="v1",
                                 field_path=field_path)

    # ---- status -------------------------------------------------------------------------------------------

    def _all_stopped(self) -> bool:
        return all("running" not in c.state for c in self.inits + self.mains) and all(
            c.proc is None for c in self.inits + self.mains)

    def phase(self) -> str:
        if self.evicted or self.deadline_exceeded:
            return "Failed"
        init = [c.status() for c in self.inits]
        mains = [c.status() for c in self.mains]
        if self.stopping and self.finished:
            if self.init_failed:
                return "Failed"
            codes = [c.state.get("terminated", {}).get("exitCode", 137) for c in self.mains]
            return "Succeeded" if codes and all(code == 0 for code in codes) else "Failed"
        return pod_phase(self.restart_policy, init, mains, self.init_failed)

    def status(self) -> dict:
        previous = (self.pod.get("status") or {}).get("conditions") or []
        phase = self.phase()
        terminal = phase in TERMINAL
        incomplete = [c.name for c in self.inits if c.state.get("terminated", {}).get("exitCode") != 0]
        unready = [c.name for c in self.mains if not c.ready]
        conds = [condition("PodReadyToStartContainers", self.sandbox_ready and not (terminal and self.finished),
                           previous=previous)]
        conds.append(condition("Initialized", not incomplete, None if not incomplete else "ContainersNotInitialized",
                               f"containers with incomplete status: [{' '.join(incomplete)}]" if incomplete else None,
                               previous))
        if terminal and self.finished:
            ready = [condition("Ready", False, "PodCompleted", None, previous),
                     condition("ContainersReady", False, "PodCompleted", None, previous)]
        else:
            msg = f"containers with unready status: [{' '.join(unready)}]" if unready else None
            ready = [condition("Ready", not unready, "ContainersNotReady" if unready else None, msg, previous),
                     condition("ContainersReady", not unready, "ContainersNotReady" if unready else None, msg,
                               previous)]
        conds += ready
        conds.append(condition("PodScheduled", True, previous=previous))
        if self.disruption:
            conds.append(condition("DisruptionTarget", True, self.disruption["reason"], self.disruption["message"],
                                   previous))
        host_ip = self.node.network.gateway
        out = {"phase": phase, "conditions": conds, "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
               "startTime": self.start_time, "containerStatuses": [c.status() for c in self.mains]}
        qos = (self.pod.get("status") or {}).get("qosClass")
        if qos:
            out["qosClass"] = qos
        if self.ip:
            out["podIP"], out["podIPs"] = self.ip, [{"ip": self.ip}]
        if self.inits:
            out["initContainerStatuses"] = [c.status() for c in self.inits]
        if self.evicted:
            out["reason"], out["message"] = "Evicted", EVICTION_MESSAGE
        elif self.deadline_exceeded:
            out["reason"] = "DeadlineExceeded"
            out["message"] = "Pod was active on the node longer than the specified deadline"
        return out

    async def write(self) -> bool:
        """PATCH the pod's /status when what the kubelet would report changed; True when the server has it
        (or the pod is gone). A failed write never stops the worker: like the kubelet's status manager,
        it is made again in the background (``_resync_status``) until the server takes it."""
        async with self._write_lock:
            status = self.status()
            comparable = {**status, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                                   for c in status["conditions"]]}
            if comparable == self._written:
                return True
            try:
                updated = await self.node.client.patch("v1", "pods", self.namespace, self.name, {"status": status},
                                                       sub="status")
            except ApiError as err:
                if err.status == 422:  # the server refuses this status: sending it again cannot help
                    log.warning("status of %s/%s refused: %s", self.namespace, self.name, err)
                    return True
                log.debug("status of %s/%s not written: %s", self.namespace, self.name, err)
                self._retry_status()
                return False
            except TRANSPORT_ERRORS as err:
                log.debug("status of %s/%s not written: %r", self.namespace, self.name, err)
                self._retry_status()
                return False
            if updated:
                self.pod = {**self.pod, "status": updated.get("status") or status}
            self._written = comparable  # None (404): the pod is gone, nothing more to write
            return True

    def _retry_status(self) -> None:
        if self._resync is None or self._resync.done():
            self._resync = self.node.spawn(self._resync_status())

    async def _resync_status(self) -> None:
        """Write the current status again after a back-off until the server has it (outlives the worker:
        the final status of a finished pod must reach the server too)."""
        delay = self.node.retry_seconds
        while True:
            await asyncio.sleep(delay)
            if await self.write():
                return
            delay = min(delay * 2, max(10.0, self.node.retry_seconds))

    async def flush(self) -> None:
        """Until the server has the current status."""
        delay = self.node.retry_seconds
        while not await self.write():
            await asyncio.sleep(delay)
            delay = min(delay * 2, max(10.0, self.node.retry_seconds))

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def update(self, pod: dict) -> None:
        self.pod = pod
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp") and self._terminating is None:
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            self._terminating = asyncio.create_task(self.terminate(float(grace)))

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless the pod is stopping; True when it is."""
        if self.stopping:
            return True
        try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation (gh-86296)
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            pass
        return self.stopping

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pod %s/%s: worker failed", self.namespace, self.name)
        finally:
            for t in self._helpers:
                if t is not asyncio.current_task() and not t.done():
                    t.cancel()
            self.node.worker_done(self)
            if self.netns:  # the sandbox goes with the pod: its netns and veth; the IP is free again
                self.node.release_network(self)

    async def _run(self) -> None:
        self.fate = self.node.fates.decide(self.pod, KUBELET)
        self.dir.mkdir(parents=True, exist_ok=True)
        await self.write()
        while True:  # volumes: a missing configMap/secret keeps the pod ContainerCreating
            try:
                lookup = await self._lookup()
                await self.node.blocking(self.volumes.setup, lookup)
                break
            except (MountError, FetchError) as err:  # retried: the pod stays ContainerCreating
                log.debug("pod %s/%s: MountVolume.SetUp failed: %s", self.namespace, self.name, err)
                self.event(WARNING, "FailedMount", str(err))
                if await self._sleep(self.node.retry_seconds):
                    return await self._finish()
        while True:  # the sandbox's network (FailedCreatePodSandBox: retried, the pod stays ContainerCreating)
            try:
                self.ip, self.netns = await self.node.blocking(self.node.network.add_pod, self.uid)
                break
            except NetworkError as err:
                log.warning("pod %s/%s: failed to set up the sandbox's network: %s", self.namespace, self.name, err)
                if await self._sleep(self.node.retry_seconds):
                    return await self._finish()
        self.sandbox_ready = True  # the pod has its IP: its own DNS record goes into the hosts files
        self._write_etc()
        self.node.refresh_dns()
        for c in self.mains if self.inits else []:
            c.waiting("PodInitializing")
        await self.write()
        if self.fate is not None and self.fate.name != "ImagePullBackOff":
            self._helpers.append(asyncio.create_task(self._play_fate()))
        deadline = (self.pod.get("spec") or {}).get("activeDeadlineSeconds")
        if deadline:
            self._helpers.append(asyncio.create_task(self._deadline(float(deadline))))
        for c in self.inits:
            while True:
                code = await self.run_container(c)
                if code is None or self.stopping:
                    return await self._finish()
                if code == 0:
                    break
                if self.restart_policy == "Never":
                    self.init_failed = True
                    return await self._finish()
                if await self._backoff(c):
                    return await self._finish()
        for c in self.mains:
            if "waiting" in c.state:
                c.waiting("ContainerCreating")
        await asyncio.gather(*(self._container_loop(c) for c in self.mains))
        await self._finish()

    async def _finish(self) -> None:
        for c in self.inits + self.mains:
            if "waiting" in c.state and self.stopping and not c.init:
                if c.last_state.get("terminated"):  # between restarts: its last run is its final state
                    c.state, c.last_state = {"terminated": c.last_state["terminated"]}, {}
                    continue
                # never started and the pod is going away: what the kubelet reports for such containers
                c.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                          "message": "The container could not be located when the pod was "
                                                     "terminated", "startedAt": None, "finishedAt": None}}
        self.finished = True
        await self.write()

    async def _container_loop(self, c: Container) -> None:
        while True:
            code = await self.run_container(c)
            if code is None or self.stopping:
                return
            if self.restart_policy == "Never" or (self.restart_policy == "OnFailure" and code == 0):
                return
            if await self._backoff(c):
                return

    async def _backoff(self, c: Container) -> bool:
        base, cap = self.node.restart_backoff
        delay = min(cap, base * (2 ** min(c.restart_count, 16)))
        c.last_state = {"terminated": c.state.get("terminated", {})}
        c.waiting("CrashLoopBackOff", f"back-off {_seconds(delay)} restarting failed container={c.name} "
                                      f"pod={self.name}_{self.namespace}({self.uid})")
        self.event(WARNING, "BackOff", f"Back-off restarting failed container {c.name} in pod "
                                       f"{self.name}_{self.namespace}({self.uid})", c)
        await self.write()
        stopped = await self._sleep(delay)
        if not stopped:
            c.restart_count += 1
        return stopped

    # ---- one container ------------------------------------------------------------------------------------------

    async def _lookup(self):
        """Fetch the configMaps and secrets the pod refers to; returns the lookup the pure code uses (None:
        not found). Any other failure (5xx, 429, a timeout, a lost connection) raises FetchError: the caller
        retries its step; each GET is bounded by the client's timeout."""
        found: dict[tuple[str, str], dict | None] = {}
        for plural, name in referenced(self.pod):
            try:
                found[(plural, name)] = await self.node.client.get("v1", plural, self.namespace, name)
            except (ApiError, *TRANSPORT_ERRORS) as err:
                kind = plural.removesuffix("s")
                raise FetchError(f"couldn't get {kind} {self.namespace}/{name}: {str(err) or repr(err)}") from err
        sa = (self.pod.get("spec") or {}).get("serviceAccountName") or "default"
        for source in token_sources(self.pod):  # TokenRequest, bound to this pod, as the kubelet's token manager
            body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "spec": {"audiences": [source["audience"]] if source.get("audience") else None,
                             "expirationSeconds": int(source.get("expirationSeconds", 3600)),
                             "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name,
                                                "uid": self.uid}}}
            try:
                found[("serviceaccounttokens", token_key(source))] = await self.node.client.request(
                    "POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{sa}/token", body)
            except (ApiError, *TRANSPORT_ERRORS) as err:
                raise FetchError(f"failed to fetch token for serviceaccount {self.namespace}/{sa}: "
                                 f"{str(err) or repr(err)}") from err
        return lambda plural, name: found.get((plural, name))

    async def _pull(self, c: Container):
        image = c.spec.get("image", "")
        attempt = 0
        while not self.stopping:
            message = (f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed to '
                       f'resolve reference "{image}": {image}: not found')
            cfg = None
            if self._pull_fails():
                if attempt == 0:
                    self.node.fates.record("ImagePullBackOff", self.pod)
            else:
                cfg = self.node.resolve_image(image)
                if cfg is not None:
                    try:
                        await self.node.refresh_image(cfg)
                    except imagelib.BuildError as err:
                        cfg, message = None, f"rpc error: code = Unknown desc = {err}"
            if cfg is not None:
                c.image_id = self.node.image_id(image, cfg)
                return cfg
            c.waiting("ErrImagePull", message)
            self.event(WARNING, "Failed", f'Failed to pull image "{image}": {message}', c)
            self.event(WARNING, "Failed", "Error: ErrImagePull", c)
            await self.write()
            if await self._sleep(min(1.0, self.node.pull_backoff[0])):
                return None
            c.waiting("ImagePullBackOff", f'Back-off pulling image "{image}"')
            self.event(NORMAL, "BackOff", f'Back-off pulling image "{image}"', c)
            self.event(WARNING, "Failed", "Error: ImagePullBackOff", c)
            await self.write()
            base, cap = self.node.pull_backoff
            if await self._sleep(min(cap, base * (2 ** min(attempt, 16)))):
                return None
            attempt += 1
        return None

    def _pull_fails(self) -> bool:
        """The ImagePullBackOff fate: pulls fail, until ``after`` seconds past the first failure (None: forever),
        as when a registry comes back or the tag is pushed; the next pull after that (back-off) succeeds."""
        if self.fate is None or self.fate.name != "ImagePullBackOff":
            return False
        now_ = asyncio.get_running_loop().time()
        if self._pull_failing_since is None:
            self._pull_failing_since = now_
            return True
        return self.fate.after is None or now_ - self._pull_failing_since < self.fate.after

    def _sandbox(self, c: Container, cfg: imagelib.ImageConfig, env: dict[str, str], instance: str) -> Spec:
        spec = c.spec
        uid, gid, groups = run_as(self.pod, spec, cfg.user)
        command = [expand(a, env) for a in spec.get("command") or []] or None
        args = [expand(a, env) for a in spec.get("args") or []] or None
        argv = cfg.argv(command, args)
        mounts = [Mount(src, dst, True) for src, dst in cfg.mounts()]
        vols = self.volumes.mounts(spec, env)
        targets = {os.path.normpath(dst) for _, dst, _ in vols}
        mounts += [Mount(src, dst, ro) for src, dst, ro in vols]
        mounts.append(Mount(str(self.hosts_path), "/etc/hosts"))
        mounts.append(Mount(str(self.dir / "etc-hostname"), "/etc/hostname", True))
        if (self.pod.get("spec") or {}).get("dnsPolicy") != "Default":  # Default: the node's own resolv.conf
            mounts.append(Mount(str(self.dir / "etc-resolv.conf"), "/etc/resolv.conf", True))
        if "/dev/shm" not in targets:
            mounts.append(Mount(str(self.dir / "shm"), "/dev/shm"))
        term_path = spec.get("terminationMessagePath") or "/dev/termination-log"
        c.term_path = self.dir / "containers" / c.name / instance
        c.term_path.parent.mkdir(parents=True, exist_ok=True)
        c.term_path.write_bytes(b"")
        os.chmod(c.term_path, 0o666)
        mounts.append(Mount(str(c.term_path), term_path))
        sc = spec.get("securityContext") or {}
        full_env = {**cfg.env, "HOSTNAME": hostname(self.pod), **env}
        return Spec(argv=argv, env=full_env, scratch=str(self.dir / "containers" / c.name / f"{instance}.rootfs"),
                    cwd=spec.get("workingDir") or cfg.workdir or "/", mounts=mounts, uid=uid, gid=gid,
                    groups=groups, no_new_privs=sc.get("allowPrivilegeEscalation") is False,
                    cap_drop=list((sc.get("capabilities") or {}).get("drop") or []),
                    cap_add=list((sc.get("capabilities") or {}).get("add") or []),
                    read_only_root=bool(sc.get("readOnlyRootFilesystem")), hostname=hostname(self.pod),
                    netns=f"/run/netns/{self.netns}" if self.netns else "")

    def _with_ips(self) -> dict:
        """The pod with the IPs the kubelet knows, whatever version of it the informer delivered last."""
        status = {**(self.pod.get("status") or {}), "hostIP": self.node.network.gateway,
                  "hostIPs": [{"ip": self.node.network.gateway}]}
        if self.ip:
            status["podIP"], status["podIPs"] = self.ip, [{"ip": self.ip}]
        return {**self.pod, "status": status}

    async def run_container(self, c: Container) -> int | None:
        """Start one instance of the container and wait for it; its exit code (None: the pod stopped first)."""
        while not self.stopping:
            cfg = await self._pull(c)
            if cfg is None:
                return None
            try:
                lookup = await self._lookup()
                env = container_env(self._with_ips(), c.spec, lookup, service_env=self.node.service_env(),
                                    allocatable=self.node.capacity)
                instance = f"{c.restart_count}-{os.urandom(3).hex()}"
                spec = self._sandbox(c, cfg, env, instance)
                break
            except (ConfigError, FetchError) as err:
                c.waiting("CreateContainerConfigError", str(err))
                self.event(WARNING, "Failed", f"Error: {err}", c)
                await self.write()
                if await self._sleep(self.node.retry_seconds):
                    return None
        else:
            return None
        c.instances += 1
        logs = self.node.log_dir(self) / c.name
        logs.mkdir(parents=True, exist_ok=True)
        c.log_path = str(logs / f"{c.restart_count}.log")
        Path(c.log_path).write_bytes(b"")
        c.container_id = _container_id()
        c.oom = False
        c.killed_by = None
        c.spec_for_probes = spec
        try:
            c.proc = await self.node.blocking(sandbox_start, spec, c.log_path)
        except StartError as err:
            c.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": err.message,
                                      "startedAt": EPOCH, "finishedAt": now(), "containerID": c.container_id}}
            self.event(WARNING, "Failed", f"Error: {err.message}", c)
            await self.write()
            return 128
        started_at = now()
        c.state = {"running": {"startedAt": started_at}}
        c.started = not c.spec.get("startupProbe")
        c.ready = c.started and not c.spec.get("readinessProbe") and not c.init
        await self.node.register_log(self, c)
        await self.write()
        if not c.init:
            self._running.set()
        probes = asyncio.create_task(self._probes(c)) if not c.init else None
        code = await self.node.blocking(c.proc.wait)
        if probes is not None:
            probes.cancel()
        if code < 0:
            code = 128 - code  # killed by a signal: 128 + its number, as the runtime reports
        reason = "OOMKilled" if c.oom else ("Completed" if code == 0 else "Error")
        message = termination_message(c.term_path.read_bytes() if c.term_path.exists() else b"",
                                      lambda: tail_bytes(c.log_path), c.spec.get("terminationMessagePolicy"), code)
        term = {"exitCode": code, "reason": reason, "startedAt": started_at, "finishedAt": now(),
                "containerID": c.container_id}
        if message:
            term["message"] = message
        c.proc = None
        c.ready = False
        c.started = False
        c.state = {"terminated": term}
        shutil.rmtree(spec.scratch, ignore_errors=True)
        await self.write()
        return code

    # ---- probes -----------------------------------------------------------------------------------------------

    async def _probe_once(self, c: Container, probe: dict) -> bool:
        return await probes.check(probe, c.spec, c.spec_for_probes, str(Path(c.log_path).with_suffix(".probe")),
                                  self.node.blocking, host=self.ip or "127.0.0.1")

    async def _probes(self, c: Container) -> None:
        startup, readiness, liveness = (c.spec.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe"))
        if startup:
            if not await self._probe_phase(c, startup, "startup"):
                return
            c.started = True
            c.ready = not readiness
            await self.write()
        tasks = []
        if readiness:
            tasks.append(self._probe_phase(c, readiness, "readiness"))
        if liveness:
            tasks.append(self._probe_phase(c, liveness, "liveness"))
        await asyncio.gather(*tasks)

    async def _probe_phase(self, c: Container, probe: dict, kind: str) -> bool:
        """startup: until success (True) or failureThreshold failures (kill, False); readiness: forever,
        flipping ``ready``; liveness: forever, killing on failureThreshold failures."""
        period = float(probe.get("periodSeconds") or 10)
        success_needed = int(probe.get("successThreshold") or 1)
        failures_allowed = int(probe.get("failureThreshold") or 3)
        if await self._sleep(float(probe.get("initialDelaySeconds") or 0)):
            return False
        successes = failures = 0
        while c.proc is not None and not self.stopping:
            ok = await self._probe_once(c, probe)
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            if kind == "startup":
                if ok:
                    return True
                if failures >= failures_allowed:
                    await self._kill_container(c, "startup")
                    return False
            elif kind == "readiness":
                ready = c.ready
                if successes >= success_needed:
                    ready = True
                elif failures >= failures_allowed:
                    ready = False
                if ready != c.ready:
                    c.ready = ready
                    await self.write()
            elif failures >= failures_allowed:
                await self._kill_container(c, "liveness")
                return False
            if await self._sleep(period):
                return False
        return False

    async def _kill_container(self, c: Container, why: str) -> None:
        proc = c.proc
        if proc is None:
            return
        c.killed_by = why
        grace = float((self.pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
        await self._stop_process(proc, grace)

    async def _stop_process(self, proc, grace: float) -> None:
        _killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await self.node.blocking(proc.wait)
        except TimeoutError:
            _killpg(proc.pid, signal.SIGKILL)

    # ---- stopping ------------------------------------------------------------------------------------------

    async def terminate(self, grace: float) -> None:
        """Graceful deletion: SIGTERM, SIGKILL after ``grace``, the terminal status, then the final DELETE."""
        self._begin_stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        stopped: set[int] = set()
        # A container may still be starting when the deletion arrives: whatever process exists by the time the
        # worker ends is stopped too, SIGKILLed at once once the grace period is over.
        while True:
            procs = [c.proc for c in self.inits + self.mains if c.proc is not None and id(c.proc) not in stopped]
            stopped.update(id(p) for p in procs)
            await asyncio.gather(*(self._stop_process(p, max(deadline - loop.time(), 0.0)) for p in procs))
            if self.task is None or self.task.done() or loop.time() > deadline + 30:
                break
            try:
                async with asyncio.timeout(0.5):
                    await asyncio.shield(self.task)
            except TimeoutError:
                pass
        # as the status manager: the terminal status reaches the server first, then the pod can go
        await self.flush()
        await self.node.final_delete(self.namespace, self.name, self.uid)

    def _begin_stop(self) -> None:
        self.stopping = True
        self._stop.set()

    def kill_all(self) -> None:
        """SIGKILL every process now (the pod is gone from the API, or the node is lost/stopping)."""
        self._begin_stop()
        for c in self.inits + self.mains:
            if c.proc is not None:
                _killpg(c.proc.pid, signal.SIGKILL)

    async def _deadline(self, seconds: float) -> None:
        if await self._sleep(seconds):
            return
        self.deadline_exceeded = True
        self._begin_stop()
        grace = float((self.pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
        await asyncio.gather(*(self._stop_process(c.proc, grace) for c in self.inits + self.mains if c.proc))

    async def _play_fate(self) -> None:
        fate = self.fate
        await self._running.wait()
        if await self._sleep(fate.after or 0):
            return
        self.node.fates.record(fate.name, self.pod)
        if fate.name == "OOMKilled":
            target = next((c for c in self.mains if c.proc is not None), None)
            if target is not None:
                target.oom = True
                _killpg(target.proc.pid, signal.SIGKILL)
        elif fate.name == "Evicted":
            self.evicted = True
            self.disruption = {"reason": "TerminationByKubelet", "message": EVICTION_MESSAGE}
            self.kill_all()
        elif fate.name == "Preempted":
            self.disruption = {"reason": "PreemptionByScheduler",
                               "message": "default-scheduler: preempting to accommodate a higher priority pod"}
            await self.write()
            await self.node.persist(f"preempting {self.namespace}/{self.name}", lambda: self.node.client.delete(
                "v1", "pods", self.namespace, self.name))
        elif fate.name == "NodeLost":  # the node's task: this worker's tasks end with its pod, which it kills
            self.node.spawn(self.node.lose())

    # ---- files the containers see -------------------------------------------------------------------------------

    def _write_etc(self) -> None:
        (self.dir / "etc-hostname").write_text(hostname(self.pod) + "\n")
        shm = self.dir / "shm"
        shm.mkdir(exist_ok=True)
        os.chmod(shm, 0o1777)
        (self.dir / "etc-resolv.conf").write_text(clusterdns.resolv_conf(self.namespace))
        self.hosts_path.write_text(self.node.hosts_for(self))

    def rewrite_hosts(self, text: str) -> None:
        """In place: the containers bind-mount this inode."""
        try:
            if self.hosts_path.read_text() != text:
                with open(self.hosts_path, "r+") as fh:
                    fh.write(text)
                    fh.truncate()
        except FileNotFoundError:
            pass


def _seconds(delay: float) -> str:
    return f"{int(delay)}s" if delay >= 1 and delay == int(delay) else f"{delay:g}s"


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
