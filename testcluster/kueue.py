"""The Kueue stand-in: Kueue's batch/v1 Job integration (``kueue-controller-manager``'s job reconciler, its
workload controller and its scheduler, reduced to what an operator that creates queued Jobs depends on),
talking to the API server stand-in only over HTTP through ``testcluster.client``.

    with KueueController(server.url) as kueue: ...      # or Cluster(root, kueue=True)

It serves the Workload kind first (``kueue.x-k8s.io/v1beta1``, namespaced, with a status subresource: the
CRD in ``testcluster/kueue.x-k8s.io_workloads.yaml``, created through the API when absent, as Kueue's
manifests install it), then keeps informers on Jobs and Workloads. For every Job labelled
``kueue.x-k8s.io/queue-name`` (Jobs without it are left alone, as with ``manageJobsWithoutQueueName: false``):

- one Workload per Job, named as Kueue names it: ``job-<job name>-<5 hex>`` (the first 5 hex digits of the
  SHA-1 of "Job\\nbatch\\n<name>\\n<uid>", see ``workload_name``), with a controller ownerReference to the
  Job (``blockOwnerDeletion``), the label ``kueue.x-k8s.io/job-uid=<job uid>``, ``spec.queueName`` from the
  Job's label, ``spec.active: true`` and one pod set ``main`` (count: parallelism, at most completions;
  the Job's pod template); Event ``CreatedWorkload`` "Created Workload: <ns>/<name>" on the Job. A Job
  found running (``spec.suspend`` false) without an admitted Workload is suspended first, as Kueue does
  for Jobs its webhook did not suspend;
- every active Workload is admitted at once, or, with a ``quota``, when it fits (below): ``status.admission``
  (``clusterQueue``: the controller's ``cluster_queue`` name, one podSetAssignment per pod set with its
  count; with a quota also its ``flavors`` and ``resourceUsage``), conditions ``QuotaReserved`` True
  (reason QuotaReserved) and ``Admitted`` True (reason Admitted), a previous ``Evicted`` condition turned
  False (reason QuotaReserved, message "Previously: ..."); Events ``QuotaReserved``/``Admitted`` on the
  Workload; then the Job is unsuspended (``spec.suspend: false``, Event ``Started`` "Admitted by
  clusterQueue <cq>");
- ``quota`` (e.g. ``{"nvidia.com/gpu": 32, "cpu": 64, "memory": "512Gi"}``): the ClusterQueue's nominal
  quota, one ResourceFlavor (``flavor``, "default-flavor") covering every resource named, no cohort. A
  Workload's usage is Kueue's: per pod set, count x the template's pod requests (requests, limits where a
  request is absent; the largest init container; cpu in millicores and everything else rounded up to a
  whole unit, as Kueue's int64 values), plus ``pods`` = count when the quota names ``pods``. Workloads
  holding quota (QuotaReserved True, not Finished) use it; pending ones are admitted in creation order
  while they fit, one that does not fit not blocking later ones that do (BestEffortFIFO). One that does
  not fit keeps ``QuotaReserved`` False, reason ``Pending``, with Kueue's message, and a Warning Event
  ``Pending`` on the Workload when that message changes: "couldn't assign flavors to pod set main: " then
  ``resource <r> unavailable in ClusterQueue`` (a resource the quota does not name), else ``insufficient
  quota for <r> in flavor <f>, request > maximum capacity (<request> > <quota>)`` (it can never fit), else
  one ``insufficient unused quota for <r> in flavor <f>, <n> more needed`` per short resource (sorted,
  joined with ", "); quantities printed as Kueue prints them (cpu "1500m"/"2", memory "4Gi", others
  "32"). Its Job stays suspended (suspended again if someone unsuspends it). Quota is released when a
  Workload finishes, is deactivated (once its pods are gone, below) or is deleted with its Job; then the
  pending ones are looked at again;
- Kueue owns ``spec.suspend`` of a Job it manages: while the Workload is admitted and active, a Job that
  someone else suspends is unsuspended again; while it is not admitted, a Job that someone unsuspends is
  suspended again. An operator's own ``suspend`` patch on a queued Job is therefore undone; what stops the
  Job for good is ``spec.active: false`` on its Workload;
- ``spec.active: false``: condition ``Evicted`` True (reason InactiveWorkload, "The workload is
  deactivated"), then the Job is suspended (Event ``Stopped``; the Job controller deletes its pods), then,
  once the Job has no active pods (``status.active`` 0), the quota is released: ``QuotaReserved`` False
  (reason Pending), ``Admitted`` False (reason NoReservation), ``Requeued`` False (reason
  InactiveWorkload), ``status.admission`` removed. It stays so until ``spec.active`` is true again: then
  ``Requeued`` True (reason Reactivated), it is admitted again and the Job unsuspended;
- a finished Job (condition Complete or Failed True): ``Finished`` True on the Workload (reason
  Succeeded, "Job finished successfully", or Failed with the Job's Failed message); a finished Workload is
  not touched again (its admission stays, as in Kueue);
- the Workload goes with its Job through the ownerReference (the stand-in's garbage collector); more
  than one Workload owned by one Job: the extra ones are deleted.

Status writes are merge patches of ``workloads/<name>/status`` carrying the cached resourceVersion (a
stale cache gets 409 and a retry); Job writes are merge patches of ``spec.suspend``. Failed syncs are
retried after ``retry`` seconds.

Not emulated: LocalQueue/ClusterQueue/ResourceFlavor/AdmissionCheck/WorkloadPriorityClass objects (no such
kinds are served: every Workload goes into the one ClusterQueue named by ``cluster_queue``, whatever its
queue name; without a ``quota`` every Workload is admitted at once and nothing is ever Pending), more than
one flavor or resource group, cohorts and borrowing, preemption (so nothing is preempted, and a Workload
waiting for quota says what is missing and never "Pending the preemption of ..."), priorities, StrictFIFO,
requeueing with backoff, ``status.resourceRequests``, the granular QuotaReserved reasons of newer Kueue
(``ExceedsMaxQuota``...: here always ``Pending``), Kueue's map order (where several resources exceed the
maximum capacity the first by name is reported alone, and a pod set's messages do not mix an "unused"
shortfall with a "maximum capacity" one), the webhooks (defaulting ``suspend: true`` on create, validation
of the queue-name label), injecting a flavor's node selectors/tolerations into the Job's template on start
and restoring them on stop, resetting the Job's ``status.startTime`` on stop, partial admission,
``waitForPodsReady`` and PodsReady, ``maximumExecutionTimeSeconds``, re-creating the Workload when the Job's
pod sets change, the ``kueue.x-k8s.io/resource-in-use`` finalizer on Workloads (here a Workload has no
finalizer and is collected as soon as its Job is gone), prebuilt workloads, integrations other than batch/v1
Job, objectRetentionPolicies, metrics, leader election, visibility API.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import yaml

from .client import ApiError, Client, Informer
from .events import NORMAL, WARNING, EventRecorder
from .jobapi import find_condition, format_time, is_finished, parse_time
from .jobcontroller import Component, Key, WorkQueue, cancel_all, key_of
from .podspec import quantity
from .scheduler import pod_requests

log = logging.getLogger("testcluster.kueue")

GROUP = "kueue.x-k8s.io"
WORKLOAD_GV = f"{GROUP}/v1beta1"
WORKLOADS = "workloads"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
CRD_PATH = Path(__file__).with_name("kueue.x-k8s.io_workloads.yaml")
CRD_NAME = "workloads.kueue.x-k8s.io"
POD_SET = "main"  # kueue.DefaultPodSetName
FLAVOR = "default-flavor"
HASH_LENGTH = 5
MAX_PREFIX = 252 - HASH_LENGTH

# condition types and reasons, as Kueue's API names them
QUOTA_RESERVED, ADMITTED, EVICTED, REQUEUED, FINISHED = "QuotaReserved", "Admitted", "Evicted", "Requeued", "Finished"
INACTIVE = "InactiveWorkload"
DEACTIVATED_MESSAGE = "The workload is deactivated"


def workload_crd() -> dict:
    """The Workload CRD the stand-in serves."""
    return yaml.safe_load(CRD_PATH.read_text())


def workload_name(job_name: str, job_uid: str) -> str:
    """Kueue's name for a Job's Workload: ``job-<name>`` (cut to 247 characters) + "-" + 5 hex digits of
    SHA-1 over kind, group, name and uid."""
    digest = hashlib.sha1(f"Job\nbatch\n{job_name}\n{job_uid}".encode()).hexdigest()
    return f"job-{job_name}"[:MAX_PREFIX] + "-" + digest[:HASH_LENGTH]


def pod_sets(job: dict) -> list[dict]:
    """The Job's one pod set: count = parallelism (default 1), at most completions."""
    spec = job.get("spec") or {}
    count = spec.get("parallelism")
    count = 1 if count is None else int(count)
    if spec.get("completions") is not None:
        count = min(count, int(spec["completions"]))
    return [{"name": POD_SET, "count": count, "template": spec.get("template") or {}}]


def condition(obj: dict, type_: str) -> dict | None:
    return find_condition((obj.get("status") or {}).get("conditions") or [], type_)


def is_true(obj: dict, type_: str) -> bool:
    cond = condition(obj, type_)
    return cond is not None and cond.get("status") == "True"


def is_active(wl: dict) -> bool:
    return (wl.get("spec") or {}).get("active") is not False


def is_admitted(wl: dict) -> bool:
    return is_true(wl, ADMITTED)


def has_quota(wl: dict) -> bool:
    return is_true(wl, QUOTA_RESERVED)


def owner_uid(wl: dict) -> str | None:
    """The uid of the Job that controls ``wl`` (None: not a Job's Workload)."""
    for ref in (wl.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "Job" and ref.get("apiVersion") == "batch/v1":
            return ref.get("uid")
    return None


def _owner_name(wl: dict) -> str | None:
    for ref in (wl.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "Job" and ref.get("apiVersion") == "batch/v1":
            return ref.get("name")
    return None


def _set(conditions: list[dict], type_: str, status: str, reason: str, message: str, now: str,
         generation: int | None) -> bool:
    """metav1's SetStatusCondition: lastTransitionTime changes only with the status. True if changed."""
    new = {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": now}
    if generation is not None:
        new["observedGeneration"] = generation
    for i, cond in enumerate(conditions):
        if cond.get("type") == type_:
            if cond.get("status") == status:
                new["lastTransitionTime"] = cond.get("lastTransitionTime") or now
            if cond == new:
                return False
            conditions[i] = new
            return True
    conditions.append(new)
    return True


# ---- quota: Kueue's flavor assigner for one flavor covering every resource of the quota ---------------------

_BINARY = ("memory", "ephemeral-storage")
_DECIMAL_SUFFIXES = (("E", 18), ("P", 15), ("T", 12), ("G", 9), ("M", 6), ("k", 3))
_BINARY_SUFFIXES = (("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10))


def _is_binary(resource: str) -> bool:
    return resource in _BINARY or resource.startswith("hugepages-")


def kueue_value(resource: str, amount: Fraction) -> int:
    """A quantity as Kueue's int64 for ``resource``: cpu in millicores, the rest in units, rounded up."""
    return math.ceil(amount * 1000) if resource == "cpu" else math.ceil(amount)


def format_quantity(resource: str, value: int) -> str:
    """Kueue's ResourceQuantityString: cpu as a milli quantity ("1500m", "2"), memory-like resources in
    binary units ("4Gi"), everything else in decimal ones ("32", "2k"), canonical as resource.Quantity
    prints them."""
    if resource == "cpu":
        return _decimal(value // 1000) if value % 1000 == 0 else f"{value}m"
    if _is_binary(resource) and abs(value) >= 1024:
        for suffix, power in _BINARY_SUFFIXES:
            if value % (1 << power) == 0:
                return f"{value >> power}{suffix}"
        return str(value)
    return _decimal(value)


def _decimal(value: int) -> str:
    for suffix, exponent in _DECIMAL_SUFFIXES:
        if value and value % 10 ** exponent == 0:
            return f"{value // 10 ** exponent}{suffix}"
    return str(value)


def parse_quota(quota: dict) -> dict[str, int]:
    """{"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 32} -> Kueue's int64 per resource."""
    return {res: kueue_value(res, quantity(amount)) for res, amount in quota.items()}


def pod_set_usage(pod_set: dict, counted: dict[str, int]) -> dict[str, int]:
    """What a pod set takes from the quota: count x one pod's requests (Kueue's TotalRequests), zero
    requests left out, plus ``pods`` when the quota ``counted`` names it."""
    count = int(pod_set.get("count", 1))
    per_pod = pod_requests(pod_set.get("template") or {})
    usage = {res: kueue_value(res, amount) * count for res, amount in per_pod.items() if amount > 0}
    if "pods" in counted:
        usage["pods"] = count
    return usage


def flavor_reasons(usage: dict[str, int], quota: dict[str, int], used: dict[str, int],
                   flavor: str = FLAVOR) -> list[str]:
    """Why a pod set does not fit now, in Kueue's words ([]: it fits). A resource the quota does not name
    or more than the whole quota can never fit, and is reported alone (Kueue stops at it); otherwise each
    resource short of unused quota says how much more is needed."""
    for res in sorted(usage):
        if res not in quota:
            return [f"resource {res} unavailable in ClusterQueue"]
    for res in sorted(usage):
        if usage[res] > quota[res]:
            return [f"insufficient quota for {res} in flavor {flavor}, request > maximum capacity "
                    f"({format_quantity(res, usage[res])} > {format_quantity(res, quota[res])})"]
    reasons = []
    for res in sorted(usage):
        free = quota[res] - used.get(res, 0)
        if usage[res] > free:
            reasons.append(f"insufficient unused quota for {res} in flavor {flavor}, "
                           f"{format_quantity(res, usage[res] - free)} more needed")
    return sorted(reasons)


def workload_usage(wl: dict, quota: dict[str, int]) -> Counter:
    """The quota a Workload takes, all pod sets together."""
    total: Counter = Counter()
    for ps in (wl.get("spec") or {}).get("podSets") or []:
        total.update(pod_set_usage(ps, quota))
    return total


def pending_message(wl: dict, quota: dict[str, int], used: dict[str, int], flavor: str = FLAVOR) -> str:
    """Kueue's message for a Workload that does not fit ("couldn't assign flavors to pod set main: ...");
    "" when it fits. Each pod set is checked with the pod sets before it added (as Kueue's assigner);
    one that can never fit ends the look."""
    parts, before = [], Counter()
    for ps in (wl.get("spec") or {}).get("podSets") or []:
        usage = pod_set_usage(ps, quota)
        reasons = flavor_reasons({r: v + before[r] for r, v in usage.items()}, quota, used, flavor)
        if reasons:
            parts.append(f"couldn't assign flavors to pod set {ps.get('name', POD_SET)}: {', '.join(reasons)}")
            if "unused" not in reasons[0]:
                break
        before.update(usage)
    return "; ".join(parts)


def holds_quota(wl: dict) -> bool:
    """Does ``wl`` count against the quota (reserved, not finished)?"""
    return has_quota(wl) and not is_true(wl, FINISHED)


class KueueController(Component):
    """Kueue's batch/v1 Job integration, reduced (see the module docstring). ``cluster_queue``: the
    ClusterQueue name written into every admission; ``install_crd``: create the Workload CRD through the
    API when it is absent; ``namespace``: watch one namespace only (None: all); ``quota``: the
    ClusterQueue's nominal quota per resource (None: none, every Workload admitted at once) in the one
    ResourceFlavor ``flavor``."""

    thread_name = "kueue-controller-manager"

    def __init__(self, url: str, *, namespace: str | None = None, cluster_queue: str = "cluster-queue",
                 install_crd: bool = True, retry: float = 1.0, quota: dict | None = None, flavor: str = FLAVOR,
                 user_agent: str = "kueue/v0.13.0 (testcluster) kueue-controller-manager"):
        super().__init__()
        self.url = url
        self.namespace = namespace
        self.cluster_queue = cluster_queue
        self.install_crd = install_crd
        self.retry = retry
        self.user_agent = user_agent
        self.client: Client | None = None
        self.jobs: Informer | None = None
        self.workloads: Informer | None = None
        self.queue: WorkQueue | None = None
        self.job_events: EventRecorder | None = None
        self.admission_events: EventRecorder | None = None
        self.created: list[Key] = []  # Workloads it created, (namespace, name), in order (tests)
        self.quota = parse_quota(quota) if quota is not None else None
        self.flavor = flavor
        # Admissions written but not yet seen through the watch (uid -> usage): counted, so two syncs in a
        # row never hand out the same quota twice (Kueue's cache "assumes" a workload the same way).
        self.assumed: dict[str, Counter] = {}
        self._holding: set[str] = set()  # uids of the Workloads holding quota, as the watch last showed
        self._order: dict[Key, int] = {}  # creation order of the Workloads it created (ties of a second)

    async def ensure_crd(self) -> None:
        crd = await self.client.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, CRD_NAME)
        if crd is None:
            try:
                await self.client.create("apiextensions.k8s.io/v1", "customresourcedefinitions", None,
                                         workload_crd())
            except ApiError as err:
                if err.status != 409:
                    raise

    async def run(self) -> None:
        self.client = Client(self.url, user_agent=self.user_agent)
        self.queue = WorkQueue()
        self.job_events = EventRecorder(self.client, "batch/job-kueue-controller")
        self.admission_events = EventRecorder(self.client, "kueue-admission")
        tasks: list[asyncio.Task] = []
        try:
            if self.install_crd:
                await self.ensure_crd()
            self.jobs = Informer(self.client, "batch/v1", "jobs", self.namespace, on_event=self._on_job)
            self.workloads = Informer(self.client, WORKLOAD_GV, WORKLOADS, self.namespace,
                                      on_event=self._on_workload)
            tasks = [asyncio.create_task(self.jobs.run()), asyncio.create_task(self.workloads.run())]
            await self.jobs.synced()
            await self.workloads.synced()
            tasks.append(asyncio.create_task(self._worker()))
            self.ready.set()
            await asyncio.gather(*tasks)
        finally:
            await cancel_all(tasks)
            for recorder in (self.job_events, self.admission_events):
                await recorder.close()
            await self.client.close()

    # ---- events -----------------------------------------------------------------------------------------

    async def _on_job(self, type_: str, job: dict) -> None:
        if type_ != "DELETED" and ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL):
            self.queue.add_after(key_of(job))

    async def _on_workload(self, type_: str, wl: dict) -> None:
        name = _owner_name(wl)
        if name and type_ != "DELETED":
            self.queue.add_after(((wl.get("metadata") or {}).get("namespace") or "", name))
        if self.quota is not None:
            self._track(type_, wl)

    def _track(self, type_: str, wl: dict) -> None:
        """Follow who holds quota; when that changes (a Workload admitted, finished, deactivated or
        deleted), the pending ones are looked at again: freed quota may admit them, and their messages
        say how much is missing now."""
        uid = wl["metadata"].get("uid")
        if type_ == "DELETED" or has_quota(wl) or is_true(wl, FINISHED):
            self.assumed.pop(uid, None)  # the watch shows the admission (or its end): no need to assume it
        holds = type_ != "DELETED" and holds_quota(wl)
        if holds == (uid in self._holding):
            return
        if holds:
            self._holding.add(uid)
        else:
            self._holding.discard(uid)
        for other in self._pending():
            self.queue.add_after((other["metadata"].get("namespace") or "", _owner_name(other)))

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self._sync(key)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                log.info("kueue: job %s/%s: %s; retrying", key[0], key[1], err)
                self.queue.add_after(key, self.retry)
            finally:
                self.queue.done(key)

    # ---- quota ------------------------------------------------------------------------------------------

    def _usage(self) -> Counter:
        """The quota in use: Workloads holding it as the cache shows them, and admissions not seen yet."""
        used: Counter = Counter()
        counted = set()
        for wl in self.workloads.cache.values():
            if holds_quota(wl):
                used.update(workload_usage(wl, self.quota))
                counted.add(wl["metadata"].get("uid"))
        for uid, usage in self.assumed.items():
            if uid not in counted:
                used.update(usage)
        return used

    def _pending(self) -> list[dict]:
        """Active Job Workloads waiting for quota, oldest first (the ClusterQueue's queue)."""
        out = [wl for wl in self.workloads.cache.values()
               if _owner_name(wl) and is_active(wl) and not has_quota(wl) and not is_true(wl, FINISHED)
               and wl["metadata"].get("uid") not in self.assumed]
        return sorted(out, key=self._queue_order)

    def _queue_order(self, wl: dict) -> tuple:
        meta = wl["metadata"]
        created = parse_time(meta.get("creationTimestamp")) or 0.0
        return created, self._order.get((meta.get("namespace") or "", meta["name"]), len(self._order)), meta["name"]

    def _no_fit_message(self, wl: dict) -> str:
        """Why ``wl`` cannot be admitted now ("": it can). BestEffortFIFO: the older pending Workloads that
        fit go first; one that does not fit holds nobody up."""
        used = self._usage()
        mine = self._queue_order(wl)
        for other in self._pending():
            if self._queue_order(other) >= mine:
                break
            if other["metadata"].get("uid") != wl["metadata"].get("uid") and \
                    not pending_message(other, self.quota, used, self.flavor):
                used.update(workload_usage(other, self.quota))
        return pending_message(wl, self.quota, used, self.flavor)

    # ---- the reconciler ---------------------------------------------------------------------------------

    def _workloads_of(self, job: dict) -> list[dict]:
        ns, uid = job["metadata"].get("namespace") or "", job["metadata"].get("uid")
        out = [wl for (wns, _), wl in self.workloads.cache.items() if wns == ns and owner_uid(wl) == uid]
        return sorted(out, key=lambda w: (w["metadata"].get("creationTimestamp") or "", w["metadata"]["name"]))

    async def _sync(self, key: Key) -> None:
        job = self.jobs.cache.get(key)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        queue_name = (job["metadata"].get("labels") or {}).get(QUEUE_LABEL)
        if not queue_name:
            return
        ns, name = key
        workloads = self._workloads_of(job)
        for extra in workloads[1:]:
            await self.client.delete(WORKLOAD_GV, WORKLOADS, ns, extra["metadata"]["name"],
                                     preconditions={"uid": extra["metadata"].get("uid")})
        wl = workloads[0] if workloads else None
        suspended = bool((job.get("spec") or {}).get("suspend"))

        if is_finished(job):
            if wl is not None and not is_true(wl, FINISHED):
                await self._finish(wl, job)
            return
        if wl is None:
            if not suspended:
                await self._suspend(job, True, "Stopped", "Not admitted by cluster queue")
            await self._create_workload(job, queue_name)
            return  # the Workload's watch event brings it back here
        if is_true(wl, FINISHED):
            return

        if is_active(wl):
            if not is_admitted(wl) and self.quota is not None:
                message = self._no_fit_message(wl)
                if message:
                    await self._wait_for_quota(wl, message)
                    if not suspended:  # someone unsuspended it: not while it has no quota
                        await self._suspend(job, True, "Stopped", "Not admitted by cluster queue")
                    return  # looked at again when quota is freed (_track)
            if not is_admitted(wl):
                wl = await self._admit(wl)
            if suspended:
                await self._suspend(job, False, "Started", f"Admitted by clusterQueue {self.cluster_queue}")
            return

        # Deactivated: evict, stop the Job, release the quota once its pods are gone.
        evicted = condition(wl, EVICTED)
        if evicted is None or evicted.get("status") != "True" or evicted.get("reason") != INACTIVE:
            wl = await self._patch_conditions(wl, [(EVICTED, "True", INACTIVE, DEACTIVATED_MESSAGE)])
        if not suspended:
            await self._suspend(job, True, "Stopped", DEACTIVATED_MESSAGE)
            return  # the Job's status (active pods) comes back through the watch
        if has_quota(wl) and not int((job.get("status") or {}).get("active") or 0):
            await self._patch_conditions(wl, [(REQUEUED, "False", INACTIVE, DEACTIVATED_MESSAGE),
                                              (QUOTA_RESERVED, "False", "Pending", DEACTIVATED_MESSAGE),
                                              (ADMITTED, "False", "NoReservation", "The workload has no reservation")],
                                         admission=None)

    # ---- writes -----------------------------------------------------------------------------------------

    async def _create_workload(self, job: dict, queue_name: str) -> None:
        meta = job["metadata"]
        ns, uid = meta.get("namespace") or "", meta["uid"]
        name = workload_name(meta["name"], uid)
        body = {"apiVersion": WORKLOAD_GV, "kind": "Workload",
                "metadata": {"name": name, "namespace": ns, "labels": {JOB_UID_LABEL: uid},
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                                  "uid": uid, "controller": True, "blockOwnerDeletion": True}]},
                "spec": {"active": True, "queueName": queue_name, "podSets": pod_sets(job)}}
        try:
            await self.client.create(WORKLOAD_GV, WORKLOADS, ns, body)
        except ApiError as err:
            if err.status != 409:
                raise
            # already there (the cache lags, or a predecessor's is still being collected): look again later
            self.queue.add_after((ns, meta["name"]), self.retry)
            return
        self.created.append((ns, name))
        self._order[(ns, name)] = len(self._order)
        self.job_events.event(job, NORMAL, "CreatedWorkload", f"Created Workload: {ns}/{name}",
                              kind="Job", api_version="batch/v1")

    async def _patch_conditions(self, wl: dict, changes: list[tuple[str, str, str, str]], **status) -> dict:
        """Set conditions (type, status, reason, message) and other status fields (None: remove) with a
        resourceVersion-checked merge patch of the status subresource; returns the Workload written."""
        now = format_time(time.time())
        conditions = [dict(c) for c in (wl.get("status") or {}).get("conditions") or []]
        generation = wl["metadata"].get("generation")
        changed = False
        for type_, st, reason, message in changes:
            changed |= _set(conditions, type_, st, reason, message, now, generation)
        current = wl.get("status") or {}
        for field, value in status.items():
            if current.get(field) != value:
                changed = True
        if not changed:
            return wl
        patch = {"metadata": {"resourceVersion": wl["metadata"]["resourceVersion"]},
                 "status": {"conditions": conditions, **status}}
        ns, name = wl["metadata"].get("namespace"), wl["metadata"]["name"]
        written = await self.client.patch(WORKLOAD_GV, WORKLOADS, ns, name, patch, sub="status")
        if written is None:
            raise ApiError(404, "NotFound", f"workload {ns}/{name} is gone")
        return written

    async def _wait_for_quota(self, wl: dict, message: str) -> None:
        written = await self._patch_conditions(wl, [(QUOTA_RESERVED, "False", "Pending", message)])
        if written is not wl:  # a new message (Kueue repeats it on every try; aggregated Events, said once here)
            self.admission_events.event(written, WARNING, "Pending", message[:1024],
                                        kind="Workload", api_version=WORKLOAD_GV)

    def _assignments(self, wl: dict) -> list[dict]:
        out = []
        for ps in (wl.get("spec") or {}).get("podSets") or []:
            assignment = {"name": ps.get("name", POD_SET), "count": ps.get("count", 1), "flavors": {},
                          "resourceUsage": {}}
            if self.quota is not None:
                usage = pod_set_usage(ps, self.quota)
                assignment["flavors"] = {res: self.flavor for res in sorted(usage)}
                assignment["resourceUsage"] = {res: format_quantity(res, v) for res, v in sorted(usage.items())}
            out.append(assignment)
        return out

    async def _admit(self, wl: dict) -> dict:
        changes = []
        requeued = condition(wl, REQUEUED)
        if requeued is not None and requeued.get("status") == "False" and requeued.get("reason") == INACTIVE:
            changes.append((REQUEUED, "True", "Reactivated", "The workload was reactivated"))
        evicted = condition(wl, EVICTED)
        if evicted is not None and evicted.get("status") == "True":
            changes.append((EVICTED, "False", QUOTA_RESERVED, f"Previously: {evicted.get('message', '')}"))
        changes += [(QUOTA_RESERVED, "True", QUOTA_RESERVED, f"Quota reserved in ClusterQueue {self.cluster_queue}"),
                    (ADMITTED, "True", ADMITTED, "The workload is admitted")]
        admission = {"clusterQueue": self.cluster_queue, "podSetAssignments": self._assignments(wl)}
        uid, waited = wl["metadata"].get("uid"), 0
        if self.quota is not None:
            # assumed before the write: its watch event may come before the write's answer
            self.assumed[uid] = workload_usage(wl, self.quota)
            waited = max(int(time.time() - (parse_time(wl["metadata"].get("creationTimestamp")) or time.time())), 0)
        try:
            written = await self._patch_conditions(wl, changes, admission=admission)
        except BaseException:
            self.assumed.pop(uid, None)
            raise
        self.admission_events.event(written, NORMAL, "QuotaReserved",
                                    f"Quota reserved in ClusterQueue {self.cluster_queue}, wait time since queued "
                                    f"was {waited}s", kind="Workload", api_version=WORKLOAD_GV)
        self.admission_events.event(written, NORMAL, "Admitted",
                                    f"Admitted by ClusterQueue {self.cluster_queue}, wait time since reservation was 0s",
                                    kind="Workload", api_version=WORKLOAD_GV)
        return written

    async def _finish(self, wl: dict, job: dict) -> None:
        failed = condition(job, "Failed")
        if failed is not None and failed.get("status") == "True":
            change = (FINISHED, "True", "Failed", failed.get("message") or "Job failed")
        else:
            change = (FINISHED, "True", "Succeeded", "Job finished successfully")
        await self._patch_conditions(wl, [change])

    async def _suspend(self, job: dict, suspend: bool, reason: str, message: str) -> None:
        meta = job["metadata"]
        written = await self.client.patch("batch/v1", "jobs", meta.get("namespace"), meta["name"],
                                          {"metadata": {"resourceVersion": meta["resourceVersion"]},
                                           "spec": {"suspend": suspend}})
        if written is not None:
            self.job_events.event(written, NORMAL, reason, message, kind="Job", api_version="batch/v1")
