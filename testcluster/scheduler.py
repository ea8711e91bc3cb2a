"""The scheduler stand-in: binds each pending pod (no ``spec.nodeName``) to a node that fits, or marks it
``PodScheduled=False`` reason ``Unschedulable`` with kube-scheduler's message, and retries when pods,
nodes or claims change.

Filters, in kube-scheduler's order, the first failing one deciding a node's reason:
NodeUnschedulable (``spec.unschedulable``), TaintToleration (NoSchedule/NoExecute taints),
NodeAffinity (``nodeSelector`` and required node affinity: In, NotIn, Exists, DoesNotExist, Gt, Lt,
``matchFields`` on metadata.name), NodeResourcesFit (pod requests = max(sum of containers, largest init
container) + overhead, requests defaulting to limits, against allocatable minus the requests of the
node's non-terminal pods; the pod count). Before them, as PreFilter: the pod's PersistentVolumeClaims
must exist, and a ``priorityClassName`` must name an existing PriorityClass when the server serves
scheduling.k8s.io (Priority admission, testcluster/admission.py, refuses such a pod at create already; this
catches a class deleted since).

Not emulated: preemption (the message says no victims were found; the ``Preempted`` fate scripts it),
scores (the least-requested fitting node wins, then the name), inter-pod affinity, topology spread,
ports, volume topology and attach limits, scheduling gates beyond "not scheduled while gated",
``nominatedNodeName``, the backoff queue (retried on every change and once a second), schedulers other
than ``default-scheduler``, events.k8s.io ``series`` (the Events below are core/v1, aggregated by count).

Events (testcluster.events, source ``default-scheduler``): ``FailedScheduling`` (Warning) on the pod with
the message of its PodScheduled=False condition, when it changes and again at most every 10 s while the pod
stays unschedulable (each repeat bumps the Event's count); ``Scheduled`` (Normal) "Successfully assigned
<ns>/<pod> to <node>".
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from fractions import Fraction
from typing import Callable

from .client import TRANSPORT_ERRORS, ApiError, Client, Informer
from .events import NORMAL, WARNING, EventRecorder
from .podspec import condition, quantity

log = logging.getLogger("testcluster.scheduler")
FAILED_SCHEDULING_REPEAT = 10.0  # a pod still unschedulable is reported again at most this often (real: its
                                 # backoff, 1 s doubling to 10 s, then on cluster changes)
TERMINAL = ("Succeeded", "Failed")
RESOLVABLE = "resources"     # preemption could help (if there were victims)
UNRESOLVABLE = "unresolvable"


# ---- pure filters ----------------------------------------------------------------------------------------------

def _container_requests(c: dict) -> dict[str, Fraction]:
    res = c.get("resources") or {}
    out = {k: quantity(v) for k, v in (res.get("limits") or {}).items()}  # requests default to limits
    out.update({k: quantity(v) for k, v in (res.get("requests") or {}).items()})
    return out


def pod_requests(pod: dict) -> dict[str, Fraction]:
    spec = pod.get("spec") or {}
    total: Counter = Counter()
    for c in spec.get("containers") or []:
        total.update(_container_requests(c))
    for c in spec.get("initContainers") or []:
        if c.get("restartPolicy") == "Always":  # sidecars run alongside
            total.update(_container_requests(c))
    out = dict(total)
    for c in spec.get("initContainers") or []:
        if c.get("restartPolicy") != "Always":
            for k, v in _container_requests(c).items():
                out[k] = max(out.get(k, Fraction(0)), v)
    for k, v in (spec.get("overhead") or {}).items():
        out[k] = out.get(k, Fraction(0)) + quantity(v)
    return out


def tolerates(toleration: dict, taint: dict) -> bool:
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    op = toleration.get("operator") or "Equal"
    if not toleration.get("key"):
        return op == "Exists"  # an empty key with Exists tolerates everything
    if toleration["key"] != taint.get("key"):
        return False
    return op == "Exists" or (toleration.get("value") or "") == (taint.get("value") or "")


def _expression(expr: dict, value: str | None) -> bool:
    op, values = expr.get("operator"), expr.get("values") or []
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt"):
        try:
            have, want = int(value), int(values[0])
        except (TypeError, ValueError, IndexError):
            return False
        return have > want if op == "Gt" else have < want
    return False


def _term(term: dict, node: dict) -> bool:
    exprs, fields = term.get("matchExpressions") or [], term.get("matchFields") or []
    if not exprs and not fields:
        return False  # an empty term matches no node
    labels = (node.get("metadata") or {}).get("labels") or {}
    name = (node.get("metadata") or {}).get("name")
    return (all(_expression(e, labels.get(e.get("key"))) for e in exprs)
            and all(_expression(f, name if f.get("key") == "metadata.name" else None) for f in fields))


def affinity_matches(pod: dict, node: dict) -> bool:
    spec = pod.get("spec") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required is not None:
        return any(_term(t, node) for t in required.get("nodeSelectorTerms") or [])
    return True


def node_reasons(pod: dict, node: dict, node_pods: list[dict]) -> tuple[list[str], str]:
    """Why ``pod`` does not fit on ``node`` (empty: it fits) and whether preemption could help."""
    spec = pod.get("spec") or {}
    tolerations = spec.get("tolerations") or []
    nspec = node.get("spec") or {}
    if nspec.get("unschedulable") and not any(
            tolerates(t, {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}) for t in tolerations):
        return ["node(s) were unschedulable"], UNRESOLVABLE
    for taint in nspec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(tolerates(t, taint) for t in tolerations):
            return [f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value') or ''}}}"], UNRESOLVABLE
    if not affinity_matches(pod, node):
        return ["node(s) didn't match Pod's node affinity/selector"], UNRESOLVABLE
    allocatable = {k: quantity(v) for k, v in ((node.get("status") or {}).get("allocatable") or {}).items()}
    used: Counter = Counter()
    for other in node_pods:
        used.update(pod_requests(other))
    reasons = []
    if len(node_pods) + 1 > allocatable.get("pods", Fraction(110)):
        reasons.append("Too many pods")
    for resource, amount in sorted(pod_requests(pod).items()):
        if amount > 0 and amount > allocatable.get(resource, Fraction(0)) - used.get(resource, Fraction(0)):
            reasons.append(f"Insufficient {resource}")
    return reasons, RESOLVABLE


def unschedulable_message(total: int, per_node: list[tuple[list[str], str]]) -> str:
    """kube-scheduler's FitError text: "0/1 nodes are available: 1 Insufficient cpu. preemption: ..."."""
    counts: Counter = Counter()
    preemption: Counter = Counter()
    for reasons, kind in per_node:
        counts.update(reasons)
        preemption["No preemption victims found for incoming pod" if kind == RESOLVABLE
                   else "Preemption is not helpful for scheduling"] += 1
    body = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
    tail = ", ".join(f"{n} {r}" for r, n in sorted(preemption.items()))
    return f"0/{total} nodes are available: {body}. preemption: 0/{total} nodes are available: {tail}."


def prefilter(pod: dict, pvcs: set[tuple[str, str]] | None, priority_classes: set[str] | None) -> str | None:
    """A pod-level reason no node can help with (the message replaces the per-node list)."""
    ns = (pod.get("metadata") or {}).get("namespace", "")
    spec = pod.get("spec") or {}
    if pvcs is not None:
        for vol in spec.get("volumes") or []:
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and (ns, claim) not in pvcs:
                return f'persistentvolumeclaim "{claim}" not found'
    name = spec.get("priorityClassName")
    if name and priority_classes is not None and name not in priority_classes \
            and name not in ("system-cluster-critical", "system-node-critical"):
        return f"no PriorityClass with name {name} was found"
    return None


def prefilter_message(total: int, reason: str) -> str:
    return (f"0/{total} nodes are available: {reason}. preemption: 0/{total} nodes are available: "
            f"{total} Preemption is not helpful for scheduling.")


# ---- the loop --------------------------------------------------------------------------------------------------

class Scheduler:
    """Watches pods, nodes, PVCs (and PriorityClasses when served); schedules pending pods one at a time,
    higher ``spec.priority`` first, then oldest first. ``hold(pod) -> str | None``: a scripted verdict
    (the node's fates): "ignore" (never scheduled) or an Unschedulable message."""

    def __init__(self, client: Client, *, hold: Callable[[dict], str | None] | None = None,
                 name: str = "default-scheduler", retry_seconds: float = 1.0):
        self.client = client
        self.name = name
        self.hold = hold
        self.retry_seconds = retry_seconds
        self._wake = asyncio.Event()
        self.pods = Informer(client, "v1", "pods", on_event=self._changed)
        self.nodes = Informer(client, "v1", "nodes", on_event=self._changed)
        self.pvcs = Informer(client, "v1", "persistentvolumeclaims", on_event=self._changed)
        self.priority_classes: Informer | None = None
        self._assumed: dict[str, str] = {}  # pod uid -> node, until the informer shows the binding
        self._reported: dict[str, tuple[str, float]] = {}  # pod uid -> last FailedScheduling message, when
        self.recorder = EventRecorder(client, name)
        self.bound = 0

    async def _changed(self, _type: str, _obj: dict) -> None:
        self._wake.set()

    def kick(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        tasks = [asyncio.create_task(i.run()) for i in (self.pods, self.nodes, self.pvcs)]
        try:
            if await self._served("scheduling.k8s.io/v1", "priorityclasses"):
                self.priority_classes = Informer(self.client, "scheduling.k8s.io/v1", "priorityclasses",
                                                 on_event=self._changed)
                tasks.append(asyncio.create_task(self.priority_classes.run()))
                await self.priority_classes.synced()
            await asyncio.gather(self.pods.synced(), self.nodes.synced(), self.pvcs.synced())
            while True:
                self._wake.clear()
                try:
                    await self.schedule_pending()
                except (ApiError, *TRANSPORT_ERRORS) as err:
                    log.debug("scheduling pass failed: %s", err)
                try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation (gh-86296)
                    async with asyncio.timeout(self.retry_seconds):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.recorder.close()

    async def _served(self, gv: str, plural: str) -> bool:
        try:
            doc = await self.client.request("GET", f"/apis/{gv}")
        except (ApiError, *TRANSPORT_ERRORS):
            return False
        return any(r.get("name") == plural for r in (doc or {}).get("resources") or [])

    def _pending(self) -> list[dict]:
        out = []
        for pod in self.pods.cache.values():
            spec, meta = pod.get("spec") or {}, pod.get("metadata") or {}
            if spec.get("nodeName") or meta.get("deletionTimestamp") or meta.get("uid") in self._assumed:
                continue
            if (spec.get("schedulerName") or "default-scheduler") != self.name or spec.get("schedulingGates"):
                continue
            if (pod.get("status") or {}).get("phase") in TERMINAL:
                continue
            out.append(pod)
        return sorted(out, key=lambda p: (-int((p.get("spec") or {}).get("priority") or 0),
                                          (p.get("metadata") or {}).get("creationTimestamp", ""),
                                          (p.get("metadata") or {}).get("name", "")))

    def _node_pods(self, node: str) -> list[dict]:
        out = []
        for pod in self.pods.cache.values():
            uid = (pod.get("metadata") or {}).get("uid")
            on = (pod.get("spec") or {}).get("nodeName") or self._assumed.get(uid)
            if on == node and (pod.get("status") or {}).get("phase") not in TERMINAL:
                out.append(pod)
        return out

    async def schedule_pending(self) -> None:
        # forget assumptions the cache has caught up with (or whose pods are gone)
        live = {(p.get("metadata") or {}).get("uid"): p for p in self.pods.cache.values()}
        for uid in list(self._assumed):
            if uid not in live or (live[uid].get("spec") or {}).get("nodeName"):
                del self._assumed[uid]
        for uid in list(self._reported):
            if uid not in live or (live[uid].get("spec") or {}).get("nodeName"):
                del self._reported[uid]
        nodes = sorted(self.nodes.cache.values(), key=lambda n: n["metadata"]["name"])
        pvcs = {key for key in self.pvcs.cache}
        classes = ({name for (_ns, name) in self.priority_classes.cache}
                   if self.priority_classes is not None else None)
        for pod in self._pending():
            verdict = self.hold(pod) if self.hold else None
            if verdict == "ignore":
                continue
            if verdict is not None:
                await self._unschedulable(pod, verdict)
                continue
            reason = prefilter(pod, pvcs, classes)
            if reason:
                await self._unschedulable(pod, prefilter_message(len(nodes), reason))
                continue
            fits, verdicts = [], []
            for node in nodes:
                reasons, kind = node_reasons(pod, node, self._node_pods(node["metadata"]["name"]))
                if reasons:
                    verdicts.append((reasons, kind))
                else:
                    fits.append(node)
            if not fits:
                await self._unschedulable(pod, unschedulable_message(len(nodes), verdicts) if nodes
                                          else "no nodes available to schedule pods")
                continue
            target = min(fits, key=lambda n: (len(self._node_pods(n["metadata"]["name"])), n["metadata"]["name"]))
            await self._bind(pod, target["metadata"]["name"])

    async def _bind(self, pod: dict, node: str) -> None:
        meta = pod["metadata"]
        try:
            await self.client.bind(meta["namespace"], meta["name"], node)
        except ApiError as err:
            if err.status in (404, 409):  # deleted meanwhile, or bound by someone else
                return
            raise
        self._assumed[meta["uid"]] = node
        self.bound += 1
        self.recorder.event(pod, NORMAL, "Scheduled", f"Successfully assigned {meta['namespace']}/{meta['name']} "
                            f"to {node}", kind="Pod", api_version="v1")

    async def _unschedulable(self, pod: dict, message: str) -> None:
        status = pod.get("status") or {}
        old = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
        uid = (pod.get("metadata") or {}).get("uid", "")
        last = self._reported.get(uid)
        now_ = asyncio.get_running_loop().time()
        if last is None or last[0] != message or now_ - last[1] >= FAILED_SCHEDULING_REPEAT:
            self._reported[uid] = (message, now_)
            self.recorder.event(pod, WARNING, "FailedScheduling", message, kind="Pod", api_version="v1")
        if old and old.get("status") == "False" and old.get("message") == message:
            return
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        conditions.append(condition("PodScheduled", False, "Unschedulable", message, status.get("conditions")))
        meta = pod["metadata"]
        try:
            await self.client.patch("v1", "pods", meta["namespace"], meta["name"],
                                    {"status": {"conditions": conditions}}, sub="status")
        except ApiError as err:
            if err.status not in (404, 409):
                raise
