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
- every active Workload is admitted at once: ``status.admission`` (``clusterQueue``: the controller's
  ``cluster_queue`` name, one podSetAssignment per pod set with its count), conditions ``QuotaReserved``
  True (reason QuotaReserved) and ``Admitted`` True (reason Admitted), a previous ``Evicted`` condition
  turned False (reason QuotaReserved, message "Previously: ..."); Events ``QuotaReserved``/``Admitted`` on
  the Workload; then the Job is unsuspended (``spec.suspend: false``, Event ``Started`` "Admitted by
  clusterQueue <cq>");
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

Not emulated: quota and its accounting, ResourceFlavors, LocalQueue/ClusterQueue/AdmissionCheck/
WorkloadPriorityClass objects (no such kinds are served; every Workload is admitted at once into the
ClusterQueue named by ``cluster_queue``, whatever its queue name, so nothing is ever Pending for quota,
preempted or requeued with backoff), the webhooks (defaulting ``suspend: true`` on create, validation of
the queue-name label), injecting a flavor's node selectors/tolerations into the Job's template on start
and restoring them on stop, resetting the Job's ``status.startTime`` on stop, partial admission,
``waitForPodsReady`` and PodsReady, ``maximumExecutionTimeSeconds``, re-creating the Workload when the
Job's pod sets change, the ``kueue.x-k8s.io/resource-in-use`` finalizer on Workloads (here a Workload has
no finalizer and is collected as soon as its Job is gone), prebuilt workloads, integrations other than
batch/v1 Job, objectRetentionPolicies, metrics, leader election, visibility API.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path

import yaml

from .client import ApiError, Client, Informer
from .events import NORMAL, EventRecorder
from .jobapi import find_condition, format_time, is_finished
from .jobcontroller import Component, Key, WorkQueue, cancel_all, key_of

log = logging.getLogger("testcluster.kueue")

GROUP = "kueue.x-k8s.io"
WORKLOAD_GV = f"{GROUP}/v1beta1"
WORKLOADS = "workloads"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
CRD_PATH = Path(__file__).with_name("kueue.x-k8s.io_workloads.yaml")
CRD_NAME = "workloads.kueue.x-k8s.io"
POD_SET = "main"  # kueue.DefaultPodSetName
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


class KueueController(Component):
    """Kueue's batch/v1 Job integration, reduced (see the module docstring). ``cluster_queue``: the
    ClusterQueue name written into every admission; ``install_crd``: create the Workload CRD through the
    API when it is absent; ``namespace``: watch one namespace only (None: all)."""

    thread_name = "kueue-controller-manager"

    def __init__(self, url: str, *, namespace: str | None = None, cluster_queue: str = "cluster-queue",
                 install_crd: bool = True, retry: float = 1.0,
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
        admission = {"clusterQueue": self.cluster_queue, "podSetAssignments": [
            {"name": ps.get("name", POD_SET), "count": ps.get("count", 1), "flavors": {}, "resourceUsage": {}}
            for ps in (wl.get("spec") or {}).get("podSets") or []]}
        written = await self._patch_conditions(wl, changes, admission=admission)
        self.admission_events.event(written, NORMAL, "QuotaReserved",
                                    f"Quota reserved in ClusterQueue {self.cluster_queue}, wait time since queued was 0s",
                                    kind="Workload", api_version=WORKLOAD_GV)
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
