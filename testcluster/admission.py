"""The built-in admission plugins the API server stand-in runs on pod CREATE, in kube-apiserver's order,
called from ``Core.create`` (testcluster/core.py):

mutating, before the name is generated (so errors name a ``generateName`` pod by its prefix, as the real
``admission.NewForbidden`` does: ``pods "job-" is forbidden: ...``):
- ServiceAccount: ``spec.serviceAccountName`` defaults to "default" (``spec.serviceAccount`` follows it); a
  named ServiceAccount must exist in the namespace, else 403 ``error looking up service account <ns>/<sa>:
  serviceaccount "<sa>" not found``. "default" always passes: there is no ServiceAccount controller here,
  and a real cluster has one in every namespace.
- Priority: ``priorityClassName`` must name a PriorityClass (scheduling.k8s.io/v1), else 403 ``no
  PriorityClass with name <x> was found``; ``spec.priority`` (and ``preemptionPolicy``) come from the class;
  without a name, the ``globalDefault`` class (its name is set on the pod) or priority 0. A pod that sets
  ``spec.priority`` itself to another value is refused as the real plugin refuses it. The two system classes
  (system-cluster-critical 2000000000, system-node-critical 2000001000) exist from the start and cannot be
  deleted.

validating, after the kind's validation, with the generated name:
- ResourceQuota: every ResourceQuota of the namespace (no scopes) is checked against the usage of the
  namespace's non-terminal pods plus the new one: ``pods``/``count/pods``, ``cpu``/``requests.cpu``,
  ``memory``/``requests.memory``, ``limits.cpu``, ``limits.memory``, ``requests.<resource>`` and
  ``limits.<resource>`` for extended resources (e.g. ``requests.nvidia.com/gpu``), ephemeral-storage. A pod's
  usage is Kubernetes' PodRequests/PodLimits: the sum over containers, at least each init container's (a
  sidecar, ``restartPolicy: Always``, adds to the sum), plus ``overhead``; requests default to limits as pod
  defaulting does. Over a hard limit: 403 ``exceeded quota: <quota>, requested: <k>=<v>, used: <k>=<v>,
  limited: <k>=<v>``; a quota on cpu/memory (requests or limits) refuses a pod whose containers do not all
  set it: 403 ``failed quota: <quota>: must specify <resource> for: <containers>[; ...]``.
  ``status.hard`` and ``status.used`` are kept current at once (the real quota controller takes a sync
  period): on quota create/update and whenever a pod of the namespace is created, changes phase or goes away.
  Usage is computed from the stored pods at each admission, so a raised quota admits at once.

Not emulated: quota scopes and ``scopeSelector`` (Terminating, BestEffort, PriorityClass...), object-count
quotas of other kinds (``configmaps``, ``count/jobs.batch``, ``requests.storage``... are neither tracked
nor enforced), quota on pod UPDATE (resize), LimitRanger (no default requests are filled in), the
ServiceAccount plugin's token volume (the kubelet stand-in mounts a token itself, testcluster/volumes.py)
and mountable-secrets enforcement, admission on anything but pod CREATE, PriorityClass ``value``
changes on existing pods.
"""
from __future__ import annotations

from collections import Counter
from fractions import Fraction

from .podspec import quantity
from .statuses import StatusError

SYSTEM_PRIORITY_CLASSES = {"system-cluster-critical": 2000000000, "system-node-critical": 2000001000}
HIGHEST_USER_PRIORITY = 1000000000
TERMINAL = ("Succeeded", "Failed")
# cpu/memory quotas require each container to state them (quota's "backward compatibility requirement")
_MUST_SPECIFY = frozenset({"cpu", "memory", "requests.cpu", "requests.memory", "limits.cpu", "limits.memory"})


def forbidden(name: str, message: str) -> StatusError:
    return StatusError(403, "Forbidden", f'pods "{name}" is forbidden: {message}', {"name": name, "kind": "pods"})


def admission_name(meta: dict) -> str:
    """How admission names an object whose name may not be generated yet."""
    return meta.get("name") or meta.get("generateName") or "Unknown"


# ---- mutating: ServiceAccount, Priority -------------------------------------------------------------------

def admit_service_account(pod: dict, ns: str, lookup) -> None:
    spec = pod.setdefault("spec", {})
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    spec["serviceAccountName"] = spec["serviceAccount"] = sa
    if sa != "default" and lookup("", "v1", "serviceaccounts", ns, sa) is None:
        raise forbidden(admission_name(pod["metadata"]), f"error looking up service account {ns}/{sa}: "
                        f'serviceaccount "{sa}" not found')


def priority_classes(lookup_all) -> dict[str, dict]:
    """name -> PriorityClass: the stored ones, with the system classes always there."""
    out = {name: {"metadata": {"name": name}, "value": value, "preemptionPolicy": "PreemptLowerPriority"}
           for name, value in SYSTEM_PRIORITY_CLASSES.items()}
    for pc in lookup_all("scheduling.k8s.io", "v1", "priorityclasses", None):
        out[pc["metadata"]["name"]] = pc
    return out


def admit_priority(pod: dict, lookup_all) -> None:
    spec = pod.setdefault("spec", {})
    name = spec.get("priorityClassName")
    classes = priority_classes(lookup_all)
    if name:
        pc = classes.get(name)
        if pc is None:
            raise forbidden(admission_name(pod["metadata"]), f"no PriorityClass with name {name} was found")
    else:
        defaults = sorted((c for c in classes.values() if c.get("globalDefault")),
                          key=lambda c: (int(c.get("value") or 0), c["metadata"].get("creationTimestamp", "")))
        pc = defaults[0] if defaults else None
        if pc is not None:
            spec["priorityClassName"] = pc["metadata"]["name"]
    value = int(pc.get("value") or 0) if pc is not None else 0
    if spec.get("priority") is not None and spec["priority"] != value:
        raise forbidden(admission_name(pod["metadata"]), f"the integer value of priority ({spec['priority']}) must "
                        f"not be provided in pod spec; priority admission controller computed {value} from the "
                        "given PriorityClass name")
    spec["priority"] = value
    if pc is not None:
        spec["preemptionPolicy"] = pc.get("preemptionPolicy") or "PreemptLowerPriority"


def validate_priority_class_create(obj: dict, lookup_all) -> None:
    """The Priority plugin's part on PriorityClass create: only one globalDefault."""
    if not obj.get("globalDefault"):
        return
    for pc in lookup_all("scheduling.k8s.io", "v1", "priorityclasses", None):
        if pc.get("globalDefault") and pc["metadata"]["name"] != obj["metadata"].get("name"):
            raise StatusError(403, "Forbidden", f'priorityclasses.scheduling.k8s.io "{obj["metadata"].get("name")}" '
                              f"is forbidden: PriorityClass {pc['metadata']['name']} is already marked as default. "
                              "Only one default can exist",
                              {"name": obj["metadata"].get("name"), "group": "scheduling.k8s.io",
                               "kind": "priorityclasses"})


# ---- validating: ResourceQuota ------------------------------------------------------------------------------

def _requests_limits(c: dict) -> tuple[dict[str, Fraction], dict[str, Fraction]]:
    res = c.get("resources") or {}
    limits = {k: quantity(v) for k, v in (res.get("limits") or {}).items()}
    requests = dict(limits)  # pod defaulting: requests default to limits
    requests.update({k: quantity(v) for k, v in (res.get("requests") or {}).items()})
    return requests, limits


def _aggregate(spec: dict, which: int) -> dict[str, Fraction]:
    """Kubernetes' PodRequests (which=0) / PodLimits (which=1): containers summed; each init container
    (plus the sidecars started before it) at most; sidecars (``restartPolicy: Always``) add to the sum."""
    total: Counter = Counter()
    for c in spec.get("containers") or []:
        total.update(_requests_limits(c)[which])
    sidecars: Counter = Counter()
    init_peak: dict[str, Fraction] = {}
    for c in spec.get("initContainers") or []:
        values = Counter(_requests_limits(c)[which])
        if c.get("restartPolicy") == "Always":
            total.update(values)
            sidecars.update(values)
            values = Counter(sidecars)
        else:
            values.update(sidecars)
        for k, v in values.items():
            init_peak[k] = max(init_peak.get(k, Fraction(0)), v)
    out = dict(total)
    for k, v in init_peak.items():
        out[k] = max(out.get(k, Fraction(0)), v)
    for k, v in (spec.get("overhead") or {}).items():
        if which == 0 or k in out:  # limits: overhead only on the resources that have one
            out[k] = out.get(k, Fraction(0)) + quantity(v)
    return out


def pod_usage(pod: dict) -> dict[str, Fraction]:
    """What one pod counts against a quota (the pod evaluator's Usage)."""
    spec = pod.get("spec") or {}
    usage: dict[str, Fraction] = {"pods": Fraction(1), "count/pods": Fraction(1)}
    for k, v in _aggregate(spec, 0).items():
        if k in ("cpu", "memory"):
            usage[k] = v
        usage[f"requests.{k}"] = v
    for k, v in _aggregate(spec, 1).items():
        usage[f"limits.{k}"] = v
    return usage


def counts(pod: dict, now: float) -> bool:
    """Whether a stored pod still uses quota: not terminal, and not past its deletion's grace period."""
    if (pod.get("status") or {}).get("phase") in TERMINAL:
        return False
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp") and meta.get("deletionGracePeriodSeconds") is not None:
        from .core import _parse_time
        if now > _parse_time(meta["deletionTimestamp"]) + int(meta["deletionGracePeriodSeconds"]):
            return False
    return True


def namespace_usage(pods: list[dict], now: float) -> Counter:
    used: Counter = Counter()
    for pod in pods:
        if counts(pod, now):
            used.update(pod_usage(pod))
    return used


def tracked(resource: str) -> bool:
    """The quota keys the pod evaluator covers."""
    if resource in ("pods", "count/pods", "cpu", "memory"):
        return True
    return resource.startswith(("requests.", "limits.")) and resource != "requests.storage"


def format_quantity(value: Fraction, resource: str) -> str:
    """Canonical: the largest decimal suffix that keeps the number whole ("2k", "1500", "500m")."""
    if value == 0:
        return "0"
    if ("memory" in resource or "storage" in resource) and value.denominator == 1 and value >= 1024:
        for suffix, power in (("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
            if value % (2 ** power) == 0:
                return f"{value // 2 ** power}{suffix}"
    for suffix, exp in (("E", 18), ("P", 15), ("T", 12), ("G", 9), ("M", 6), ("k", 3), ("", 0), ("m", -3),
                        ("u", -6), ("n", -9)):
        scaled = value / Fraction(10) ** exp
        if scaled.denominator == 1:
            return f"{scaled.numerator}{suffix}"
    return f"{-(-value.numerator * 10 ** 9 // value.denominator)}n"  # rounded up, as Kubernetes does


def _pretty(values: dict[str, Fraction], keys: list[str]) -> str:
    return ",".join(f"{k}={format_quantity(values.get(k, Fraction(0)), k)}" for k in sorted(keys))


def _missing(spec: dict, required: set[str]) -> dict[str, list[str]]:
    """resource -> names of containers that do not state it."""
    out: dict[str, list[str]] = {}
    for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        requests, limits = _requests_limits(c)
        have = {f"requests.{k}" for k in requests} | {k for k in requests if k in ("cpu", "memory")} | {
            f"limits.{k}" for k in limits}
        for resource in sorted(required - have):
            out.setdefault(resource, []).append(c.get("name", ""))
    return out


def admit_quota(pod: dict, quotas: list[dict], pods: list[dict], now: float) -> None:
    """Raise 403 when ``pod`` (not stored yet) would exceed one of ``quotas``; ``pods``: the namespace's
    stored pods."""
    if not quotas:
        return
    name = admission_name(pod["metadata"])
    spec = pod.get("spec") or {}
    requested = pod_usage(pod)
    used = namespace_usage(pods, now)
    for quota in sorted(quotas, key=lambda q: q["metadata"]["name"]):
        qname = quota["metadata"]["name"]
        hard = {k: quantity(v) for k, v in ((quota.get("spec") or {}).get("hard") or {}).items() if tracked(k)}
        required = set(hard) & _MUST_SPECIFY
        missing = _missing(spec, required)
        if missing:
            detail = "; ".join(f"{r} for: {','.join(sorted(set(names)))}" for r, names in sorted(missing.items()))
            raise forbidden(name, f"failed quota: {qname}: must specify {detail}")
        exceeded = [k for k, limit in hard.items() if k in requested and used.get(k, 0) + requested[k] > limit]
        if exceeded:
            raise forbidden(name, f"exceeded quota: {qname}, requested: {_pretty(requested, exceeded)}, "
                            f"used: {_pretty(used, exceeded)}, limited: {_pretty(hard, exceeded)}")


def quota_status(quota: dict, pods: list[dict], now: float) -> dict:
    """``status`` of a quota: ``hard`` as in the spec, ``used`` for the keys the pod evaluator tracks."""
    hard = dict((quota.get("spec") or {}).get("hard") or {})
    used = namespace_usage(pods, now)
    return {"hard": hard, "used": {k: format_quantity(used.get(k, Fraction(0)), k) for k in sorted(hard)
                                   if tracked(k)}}
