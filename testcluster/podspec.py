"""The kubelet's pure decisions about one container, over plain dicts: its environment (``env``,
``envFrom``, ``valueFrom`` refs), ``$(VAR)`` expansion, the user it runs as, its termination message, the
pod's hostname and managed /etc/hosts, and the pod conditions derived from container states.

Errors that keep a container from being created are ``ConfigError`` with the kubelet's message (the
container then waits with reason ``CreateContainerConfigError``).

Not emulated: ``resourceFieldRef`` divisors other than the defaults' rounding (cpu: whole cores rounded
up, memory: bytes), ``fieldRef`` paths beyond those listed in FIELD_PATHS, ``envFrom`` keys that are not
valid environment names (skipped silently; the kubelet records an event), image-defined users given by name.
"""
from __future__ import annotations

import base64
import math
import re
from datetime import datetime, timezone
from fractions import Fraction
from typing import Callable

Lookup = Callable[[str, str], "dict | None"]  # (plural "configmaps"|"secrets", name) -> object or None

FIELD_PATHS = ("metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName", "spec.serviceAccountName",
               "status.podIP", "status.podIPs", "status.hostIP", "status.hostIPs", "metadata.labels['<k>']",
               "metadata.annotations['<k>']")
TERMINATION_MESSAGE_BYTES = 4096     # kubelet: the termination-message file is read up to 4 KiB
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048  # FallbackToLogsOnError: the log's tail
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


class ConfigError(Exception):
    """The container cannot be created as specified (CreateContainerConfigError)."""


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- quantities ---------------------------------------------------------------------------------------------

_SUFFIX = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60,
           "n": Fraction(1, 10 ** 9), "u": Fraction(1, 10 ** 6), "m": Fraction(1, 1000), "": 1,
           "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15, "E": 10 ** 18}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")


def quantity(text) -> Fraction:
    """A resource.Quantity ("500m", "24Gi", "1e3", 2) as an exact number."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ValueError(f"quantities must match the regular expression "
                         f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {text!r}")
    number, exponent, suffix = match.groups()
    value = Fraction(number)
    if exponent:
        return value * Fraction(10) ** int(exponent[1:])
    return value * _SUFFIX[suffix or ""]


# ---- $(VAR) expansion ---------------------------------------------------------------------------------------

def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion: ``$(VAR)`` -> the value when VAR is defined, else left as written;
    ``$$`` -> ``$`` (so ``$$(VAR)`` stays literal); any other ``$`` is kept."""
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "$" or i + 1 >= n:
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = text.find(")", i + 2)
            if end < 0:  # unterminated: kept as written
                out.append(text[i:])
                break
            name = text[i + 2:end]
            out.append(env[name] if name in env else text[i:end + 1])
            i = end + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


# ---- env ------------------------------------------------------------------------------------------------------

def _bracket(path: str, prefix: str) -> str | None:
    match = re.fullmatch(re.escape(prefix) + r"\['(.*)'\]", path)
    return match.group(1) if match else None


def field_value(pod: dict, path: str) -> str:
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    simple = {"metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", ""),
              "metadata.uid": meta.get("uid", ""), "spec.nodeName": spec.get("nodeName", ""),
              "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
              "status.podIP": status.get("podIP", ""), "status.hostIP": status.get("hostIP", ""),
              "status.podIPs": ",".join(p.get("ip", "") for p in status.get("podIPs") or []),
              "status.hostIPs": ",".join(p.get("ip", "") for p in status.get("hostIPs") or [])}
    if path in simple:
        return simple[path]
    for prefix in ("metadata.labels", "metadata.annotations"):
        key = _bracket(path, prefix)
        if key is not None:
            return (meta.get(prefix.split(".")[1]) or {}).get(key, "")
    raise ConfigError(f'unsupported fieldPath: "{path}"')


def resource_value(container: dict, ref: dict, allocatable: dict) -> str:
    """``resourceFieldRef``: limits default to the node's allocatable when unset (as the kubelet does)."""
    resource = ref.get("resource", "")
    kind, _, name = resource.partition(".")
    section = (container.get("resources") or {}).get("limits" if kind == "limits" else "requests") or {}
    raw = section.get(name)
    if raw is None and kind == "limits":
        raw = allocatable.get(name)
    value = quantity(raw) if raw is not None else Fraction(0)
    divisor = quantity(ref.get("divisor") or "1")
    return str(math.ceil(value / divisor))


def _data(obj: dict, plural: str, key: str) -> str | None:
    if plural == "secrets":
        raw = (obj.get("data") or {}).get(key)
        return base64.b64decode(raw).decode("utf-8", "replace") if raw is not None else None
    if key in (obj.get("data") or {}):
        return obj["data"][key]
    raw = (obj.get("binaryData") or {}).get(key)
    return base64.b64decode(raw).decode("utf-8", "replace") if raw is not None else None


_KINDS = {"configmaps": ("configmap", "ConfigMap"), "secrets": ("secret", "Secret")}


def _key_ref(plural: str, ref: dict, namespace: str, lookup: Lookup) -> str | None:
    obj = lookup(plural, ref.get("name", ""))
    lower, kind = _KINDS[plural]
    if obj is None:
        if ref.get("optional"):
            return None
        raise ConfigError(f'{lower} "{ref.get("name", "")}" not found')
    value = _data(obj, plural, ref.get("key", ""))
    if value is None:
        if ref.get("optional"):
            return None
        raise ConfigError(f"couldn't find key {ref.get('key', '')} in {kind} {namespace}/{ref.get('name', '')}")
    return value


def container_env(pod: dict, container: dict, lookup: Lookup, *, service_env: dict[str, str],
                  allocatable: dict | None = None) -> dict[str, str]:
    """The variables Kubernetes gives the container (image ENV not included: the runtime puts them
    underneath): the master service's variables, then ``envFrom`` in order, then ``env`` in order, each
    ``value`` expanded with what is defined before it."""
    namespace = (pod.get("metadata") or {}).get("namespace", "")
    env = dict(service_env)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for plural, field in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
            ref = source.get(field)
            if ref is None:
                continue
            obj = lookup(plural, ref.get("name", ""))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{_KINDS[plural][0]} "{ref.get("name", "")}" not found')
            keys = list((obj.get("data") or {}))
            if plural == "configmaps":
                keys += list(obj.get("binaryData") or {})
            for key in keys:
                if _ENV_NAME.match(prefix + key):
                    env[prefix + key] = _data(obj, plural, key) or ""
    for item in container.get("env") or []:
        name = item.get("name", "")
        source = item.get("valueFrom")
        if source is None:
            env[name] = expand(item.get("value", ""), env)
        elif "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"].get("fieldPath", ""))
        elif "resourceFieldRef" in source:
            env[name] = resource_value(container, source["resourceFieldRef"], allocatable or {})
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            plural, ref = (("secrets", source["secretKeyRef"]) if "secretKeyRef" in source
                           else ("configmaps", source["configMapKeyRef"]))
            value = _key_ref(plural, ref, namespace, lookup)
            if value is not None:
                env[name] = value
    return env


def token_key(source: dict) -> str:
    """How a projected ``serviceAccountToken`` source's token is found in the lookup (audience, lifetime)."""
    return f"{source.get('audience') or ''}|{int(source.get('expirationSeconds', 3600))}"


def token_sources(pod: dict) -> list[dict]:
    """The projected ``serviceAccountToken`` sources of a pod (each one a TokenRequest by the kubelet)."""
    return [source["serviceAccountToken"] for vol in (pod.get("spec") or {}).get("volumes") or []
            for source in (vol.get("projected") or {}).get("sources") or [] if "serviceAccountToken" in source]


def referenced(pod: dict) -> set[tuple[str, str]]:
    """Every (plural, name) the pod's env and volumes refer to: fetched before the pure resolution."""
    refs: set[tuple[str, str]] = set()
    spec = pod.get("spec") or {}
    for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for source in c.get("envFrom") or []:
            if "configMapRef" in source:
                refs.add(("configmaps", source["configMapRef"].get("name", "")))
            if "secretRef" in source:
                refs.add(("secrets", source["secretRef"].get("name", "")))
        for item in c.get("env") or []:
            vf = item.get("valueFrom") or {}
            if "configMapKeyRef" in vf:
                refs.add(("configmaps", vf["configMapKeyRef"].get("name", "")))
            if "secretKeyRef" in vf:
                refs.add(("secrets", vf["secretKeyRef"].get("name", "")))
    for vol in spec.get("volumes") or []:
        if "configMap" in vol:
            refs.add(("configmaps", vol["configMap"].get("name", "")))
        if "secret" in vol:
            refs.add(("secrets", vol["secret"].get("secretName", "")))
        for source in (vol.get("projected") or {}).get("sources") or []:
            if "configMap" in source:
                refs.add(("configmaps", source["configMap"].get("name", "")))
            if "secret" in source:
                refs.add(("secrets", source["secret"].get("name", "")))
    return refs


# ---- users ------------------------------------------------------------------------------------------------------

def pod_ref(pod: dict) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('name')}_{meta.get('namespace')}({meta.get('uid')})"  # the kubelet's format.Pod


def run_as(pod: dict, container: dict, image_user: str | None) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary groups): container securityContext over the pod's over the image USER.
    ConfigError when runAsNonRoot cannot hold."""
    psc = (pod.get("spec") or {}).get("securityContext") or {}
    csc = container.get("securityContext") or {}
    image_uid: int | None = 0
    image_gid: int | None = None
    image_name = None
    if image_user:
        user, _, group = image_user.partition(":")
        if user.isdigit():
            image_uid = int(user)
        elif user == "root":
            image_uid = 0
        else:
            image_uid, image_name = None, user
        image_gid = int(group) if group.isdigit() else None
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
    from_image = uid is None
    if uid is None:
        if image_uid is None:
            if non_root:
                raise ConfigError(f"container has runAsNonRoot and image has non-numeric user ({image_name}), "
                                  f"cannot verify user is non-root (pod: \"{pod_ref(pod)}\", container: "
                                  f"{container.get('name')})")
            image_uid = 0  # a named user: not resolved here (the images use numbers)
        uid = image_uid
    if non_root and int(uid) == 0:
        if csc.get("runAsUser", psc.get("runAsUser")) is not None:
            raise ConfigError(f"container's runAsUser breaks non-root policy (pod: \"{pod_ref(pod)}\", container: "
                              f"{container.get('name')})")
        raise ConfigError(f"container has runAsNonRoot and image will run as root (pod: \"{pod_ref(pod)}\", "
                          f"container: {container.get('name')})")
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    if gid is None:  # the image's group only with the image's user; else root (/etc/passwd is not read)
        gid = image_gid if from_image and image_gid is not None else 0
    groups = [int(g) for g in psc.get("supplementalGroups") or []]
    if psc.get("fsGroup") is not None:
        groups.append(int(psc["fsGroup"]))
    return int(uid), int(gid), sorted(set(groups))


# ---- hostname and /etc/hosts --------------------------------------------------------------------------------

def hostname(pod: dict) -> str:
    spec = pod.get("spec") or {}
    return (spec.get("hostname") or (pod.get("metadata") or {}).get("name", ""))[:63].rstrip("-.")


def fqdn(pod: dict, domain: str = "cluster.local") -> str | None:
    spec = pod.get("spec") or {}
    if not spec.get("subdomain"):
        return None
    return f"{hostname(pod)}.{spec['subdomain']}.{(pod.get('metadata') or {}).get('namespace')}.svc.{domain}"


def hosts_file(pod: dict, ip: str, extra: list[tuple[str, list[str]]] = ()) -> str:
    """The kubelet-managed /etc/hosts; ``extra``: (ip, names) lines added after it (hostAliases, and the
    stand-in's cluster DNS records)."""
    lines = ["# Kubernetes-managed hosts file.", "127.0.0.1\tlocalhost",
             "::1\tlocalhost ip6-localhost ip6-loopback", "fe00::0\tip6-localnet", "fe00::0\tip6-mcastprefix",
             "fe00::1\tip6-allnodes", "fe00::2\tip6-allrouters"]
    full = fqdn(pod)
    lines.append(f"{ip}\t{full}\t{hostname(pod)}" if full else f"{ip}\t{hostname(pod)}")
    aliases = (pod.get("spec") or {}).get("hostAliases") or []
    if aliases:
        lines.append("")
        lines.append("# Entries added by HostAliases.")
        for alias in aliases:
            lines.append(f"{alias.get('ip')}\t" + "\t".join(alias.get("hostnames") or []))
    for addr, names in extra:
        lines.append(f"{addr}\t" + " ".join(names))
    return "\n".join(lines) + "\n"


# ---- termination message -------------------------------------------------------------------------------------

def termination_message(file_text: bytes, log_tail: Callable[[], bytes], policy: str | None,
                        exit_code: int) -> str:
    message = file_text[:TERMINATION_MESSAGE_BYTES]
    if not message.strip() and exit_code != 0 and policy == "FallbackToLogsOnError":
        lines = log_tail().splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
        message = b"".join(lines)[-FALLBACK_LOG_BYTES:]
    return message.decode("utf-8", "replace")


def tail_bytes(path: str, limit: int = 64 * 1024) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read()
    except FileNotFoundError:
        return b""


# ---- pod status ------------------------------------------------------------------------------------------------

def condition(type_: str, ok: bool, reason: str | None = None, message: str | None = None,
              previous: list[dict] | None = None) -> dict:
    """A pod condition; ``lastTransitionTime`` kept from ``previous`` when the status did not change."""
    status = "True" if ok else "False"
    old = next((c for c in previous or [] if c.get("type") == type_), None)
    cond = {"type": type_, "status": status, "lastProbeTime": None,
            "lastTransitionTime": old["lastTransitionTime"] if old and old.get("status") == status
            and old.get("lastTransitionTime") else now()}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def pod_phase(restart_policy: str, init_statuses: list[dict], statuses: list[dict], init_failed: bool) -> str:
    """The kubelet's getPhase for pods whose containers it has started (or tried to)."""
    if init_failed and restart_policy == "Never":
        return "Failed"
    if any("terminated" not in (s.get("state") or {}) for s in init_statuses) or not statuses:
        return "Pending"
    waiting = running = succeeded = failed = 0
    for s in statuses:
        state = s.get("state") or {}
        if "running" in state:
            running += 1
        elif "terminated" in state:
            if state["terminated"].get("exitCode") == 0:
                succeeded += 1
            else:
                failed += 1
        elif s.get("lastState", {}).get("terminated"):
            running += 1  # waiting to restart: the pod is still running
        else:
            waiting += 1
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if restart_policy == "Always":
        return "Running"
    if failed and restart_policy == "Never":
        return "Failed"
    if failed:  # OnFailure: the failed ones restart
        return "Running"
    return "Succeeded"
