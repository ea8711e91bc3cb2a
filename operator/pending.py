"""Why an attempt's pods do not run: problems a Job itself never reports (it has no condition for them), read
from its pods and Events as a user would with ``kubectl describe``. Pure functions over plain dicts.

Reasons (stable, used as the CR's Ready reason and Event reason):
- ``QuotaExceeded``: the Job controller cannot create pods (FailedCreate: ``exceeded quota`` or
  ``failed quota``); ``ServiceAccountNotFound``, ``PriorityClassNotFound``: likewise, admission refused
  the pod; ``FailedCreate``: another refusal;
- ``Unschedulable``: the scheduler cannot place a pod (no node with the GPUs, taints, a missing PVC...);
- ``ImagePullBackOff`` (also ErrImagePull, InvalidImageName): the image cannot be pulled;
- ``CreateContainerConfigError``: a Secret or ConfigMap the container's env names is missing;
- ``FailedMount``: a volume cannot be set up (a missing ConfigMap/Secret, a PVC that does not attach).
None of them ends the attempt by itself (each may clear: quota freed, a node added, the image pushed), but
past ``pending_deadline`` seconds without a running pod the operator fails the attempt for good with that
reason (operator/plan.py). A gang (a multi-pod attempt) is held while any of its pods is: pods already
running wait in the rendezvous for the ones that cannot start.

Queued attempts (``spec.resources.queueName``): Kueue admits a Job's pods all at once or not at all, and
says why not on its Workload (condition ``QuotaReserved`` False, Kueue's message). Waiting for quota is
normal (no deadline): the CR stays ``Pending``/``Queued`` with that message. A Workload larger than the
ClusterQueue can ever hold (``request > maximum capacity``, a resource the queue does not cover, or the
reason ``ExceedsMaxQuota`` of newer Kueue) is never admitted: ``ExceedsQueueCapacity``, permanent until
the spec asks for less or the queue's quota is raised.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

QUOTA_EXCEEDED = "QuotaExceeded"
SERVICE_ACCOUNT_NOT_FOUND = "ServiceAccountNotFound"
PRIORITY_CLASS_NOT_FOUND = "PriorityClassNotFound"
FAILED_CREATE = "FailedCreate"
UNSCHEDULABLE = "Unschedulable"
IMAGE_PULL = "ImagePullBackOff"
CONFIG_ERROR = "CreateContainerConfigError"
FAILED_MOUNT = "FailedMount"
EXCEEDS_QUEUE_CAPACITY = "ExceedsQueueCapacity"
REASONS = (QUOTA_EXCEEDED, SERVICE_ACCOUNT_NOT_FOUND, PRIORITY_CLASS_NOT_FOUND, FAILED_CREATE, UNSCHEDULABLE,
           IMAGE_PULL, CONFIG_ERROR, FAILED_MOUNT)
_PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


def _latest(events: list[dict], reason: str) -> dict | None:
    found = [e for e in events if e.get("reason") == reason]
    return max(found, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "") if found else None


def _create_problem(message: str) -> Problem:
    text = message.removeprefix("Error creating: ")
    if "exceeded quota" in text or "failed quota" in text:
        return Problem(QUOTA_EXCEEDED, text)
    if "error looking up service account" in text:
        return Problem(SERVICE_ACCOUNT_NOT_FOUND, text)
    if "no PriorityClass with name" in text:
        return Problem(PRIORITY_CLASS_NOT_FOUND, text)
    return Problem(FAILED_CREATE, text)


def problem(pods: list[dict], job_events: list[dict], pod_events: list[dict]) -> Problem | None:
    """The first thing that keeps the attempt's pods from running, or None (starting normally)."""
    if not pods:
        failed = _latest(job_events, "FailedCreate")
        return _create_problem(failed.get("message", "")) if failed else None
    for pod in sorted(pods, key=lambda p: p["metadata"].get("name", "")):
        name = pod["metadata"].get("name", "?")
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and \
                    cond.get("reason") == "Unschedulable":
                return Problem(UNSCHEDULABLE, f"pod {name}: {cond.get('message', '')}".strip())
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _PULL_REASONS:
                return Problem(IMAGE_PULL, f"pod {name}: container {cs.get('name')}: {waiting.get('reason')}: "
                                           f"{waiting.get('message', '')}".strip())
            if waiting.get("reason") == CONFIG_ERROR:
                return Problem(CONFIG_ERROR, f"pod {name}: container {cs.get('name')}: {waiting.get('message', '')}")
    mount = _latest(pod_events, "FailedMount")
    if mount:
        pod = (mount.get("involvedObject") or {}).get("name", "?")
        return Problem(FAILED_MOUNT, f"pod {pod}: {mount.get('message', '')}")
    return None


def running(pods: list[dict]) -> bool:
    """Has a pod of the attempt started its main work (phase Running or beyond)?"""
    return any((p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed") for p in pods)


def started_count(pods: list[dict]) -> int:
    return sum(1 for p in pods if (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed"))


def stragglers(pods: list[dict]) -> bool:
    """Is part of the attempt running while another pod of it has not started (a partial gang)?"""
    phases = [(p.get("status") or {}).get("phase") for p in pods]
    return "Pending" in phases and running(pods)


# ---- Kueue --------------------------------------------------------------------------------------------

# Kueue's words for a pod set the ClusterQueue can never hold (its flavor assigner): the request over the
# maximum capacity, "insufficient quota for nvidia.com/gpu in flavor f, request > maximum capacity (64 > 32)"
# (since v0.14, with several pod sets: "..., previously considered podsets requests (16) + current podset
# request (8) > maximum capacity (16)"), or a resource no flavor covers.
_OVER_MAXIMUM = re.compile(r"insufficient quota for (\S+) in flavor (\S+), request > maximum capacity "
                           r"\((\S+) > (\S+)\)")
_OVER_MAXIMUM_PODSETS = re.compile(r"insufficient quota for (\S+) in flavor (\S+), [^,;]*> maximum capacity "
                                   r"\((\S+)\)")
_UNCOVERED = re.compile(r"resource (\S+) unavailable in ClusterQueue")
_EXCEEDS_MAX_QUOTA = "ExceedsMaxQuota"  # QuotaReserved reason of newer Kueue (UnadmittedWorkloadsObservability)


def queue_wait(workload: dict | None) -> str | None:
    """Kueue's reason for not admitting the Workload yet (its QuotaReserved False message); None while
    Kueue has not looked at it (no Workload, no condition, or one without a message)."""
    for cond in ((workload or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "QuotaReserved" and cond.get("status") == "False":
            return cond.get("message") or None
    return None


def over_capacity(workload: dict | None) -> Problem | None:
    """``ExceedsQueueCapacity`` when Kueue says the Workload can never fit its ClusterQueue, else None.
    The message names the resource and the numbers and what would change it, then quotes Kueue."""
    message = queue_wait(workload)
    if message is None:
        return None
    reason = next((c.get("reason") for c in (workload.get("status") or {}).get("conditions") or []
                   if c.get("type") == "QuotaReserved"), None)
    found = _OVER_MAXIMUM.search(message)
    if found:
        res, flavor, asked, most = found.groups()
        return _never(f"asks for {asked} {res}, more than its ClusterQueue can ever admit ({most} in flavor "
                      f"{flavor})", message)
    found = _OVER_MAXIMUM_PODSETS.search(message)
    if found:
        res, flavor, most = found.groups()
        return _never(f"asks for more {res} than its ClusterQueue can ever admit ({most} in flavor {flavor})",
                      message)
    found = _UNCOVERED.search(message)
    if found:
        return _never(f"asks for {found.group(1)}, which its ClusterQueue has no quota for", message)
    if reason == _EXCEEDS_MAX_QUOTA:
        return _never("asks for more than its ClusterQueue can ever admit", message)
    return None


def _never(what: str, kueue: str) -> Problem:
    return Problem(EXCEEDS_QUEUE_CAPACITY, f"{what}: ask for less in spec.resources (nodes, gpusPerNode, cpu, "
                                           f"memory, extraResources) or have the queue's quota raised "
                                           f"(Kueue: {kueue})")
