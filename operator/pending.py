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
reason (operator/plan.py).
"""
from __future__ import annotations

from dataclasses import dataclass

QUOTA_EXCEEDED = "QuotaExceeded"
SERVICE_ACCOUNT_NOT_FOUND = "ServiceAccountNotFound"
PRIORITY_CLASS_NOT_FOUND = "PriorityClassNotFound"
FAILED_CREATE = "FailedCreate"
UNSCHEDULABLE = "Unschedulable"
IMAGE_PULL = "ImagePullBackOff"
CONFIG_ERROR = "CreateContainerConfigError"
FAILED_MOUNT = "FailedMount"
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
