"""Cluster DNS as /etc/hosts lines (there is no DNS server here): the A records CoreDNS would serve for
Services and for pods behind a headless Service, with the pods' IPs on the node's pod network
(testcluster.podnet). The kubelet rewrites every running pod's hosts file in place when they change.

A Service's endpoints are the pods the EndpointSlice controller would list: in its namespace, matching
its selector, with a pod IP, not terminal (Succeeded/Failed), not being deleted, and Ready, unless the
Service has ``publishNotReadyAddresses`` (then not-ready and terminating pods count too).
- a headless Service (``clusterIP: None``): ``<svc>.<ns>.svc.cluster.local`` (and ``<svc>.<ns>.svc``,
  ``<svc>.<ns>``; ``<svc>`` from its own namespace, what the search path ``<ns>.svc.cluster.local`` would
  give) -> every endpoint's IP; and an endpoint pod whose ``hostname`` is set and whose ``subdomain`` is
  the Service: ``<hostname>.<svc>.<ns>.svc.cluster.local`` (and the shorter forms; ``<hostname>.<svc>``
  from the same namespace) -> its IP;
- a ClusterIP Service: the same names -> the IP of ONE endpoint (the oldest): kube-proxy is not
  emulated, so there is no virtual ClusterIP and no load balancing, and ``port`` -> ``targetPort`` is
  not translated (clients must use the pods' own port); no endpoint: no record (a real ClusterIP would
  resolve and then refuse connections).

Not emulated: SRV and PTR records, ExternalName Services, Services without a selector (manual
EndpointSlices), the ``<a-b-c-d>.<svc>`` names of endpoints without a hostname, DNS TTLs and negative
caching (a name resolves the moment its line is written), names of pods known only to other nodes'
kubelets (each node publishes what its informers see).
"""
from __future__ import annotations

TERMINAL = ("Succeeded", "Failed")


def _ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _selects(selector: dict, pod: dict) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def endpoints(namespace: str, spec: dict, pods: dict[tuple[str, str], dict]) -> list[dict]:
    """The Service's endpoint pods, oldest first."""
    selector = spec.get("selector") or {}
    if not selector:
        return []
    publish = bool(spec.get("publishNotReadyAddresses"))
    out = []
    for (pns, _), pod in pods.items():
        status = pod.get("status") or {}
        if pns != namespace or not _selects(selector, pod) or not status.get("podIP"):
            continue
        if status.get("phase") in TERMINAL:
            continue
        if not publish and ((pod.get("metadata") or {}).get("deletionTimestamp") or not _ready(pod)):
            continue
        out.append(pod)
    return sorted(out, key=lambda p: ((p.get("metadata") or {}).get("creationTimestamp") or "",
                                      p["metadata"].get("name", "")))


def records(services: dict[tuple[str, str], dict],
            pods: dict[tuple[str, str], dict]) -> list[tuple[str, str, list[str], list[str]]]:
    """(namespace, IP, names valid anywhere, short names valid in that namespace) per record."""
    out = []
    for (ns, svc), service in sorted(services.items()):
        spec = service.get("spec") or {}
        if spec.get("type") == "ExternalName":
            continue
        eps = endpoints(ns, spec, pods)
        names = ([f"{svc}.{ns}.svc.cluster.local", f"{svc}.{ns}.svc", f"{svc}.{ns}"], [svc])
        if spec.get("clusterIP") != "None":
            if eps:
                out.append((ns, eps[0]["status"]["podIP"], *names))
            continue
        for pod in eps:
            out.append((ns, pod["status"]["podIP"], *names))
        for pod in eps:
            pspec = pod.get("spec") or {}
            host = pspec.get("hostname")
            if host and pspec.get("subdomain") == svc:
                out.append((ns, pod["status"]["podIP"], [f"{host}.{svc}.{ns}.svc.cluster.local",
                                                          f"{host}.{svc}.{ns}.svc", f"{host}.{svc}.{ns}"],
                            [f"{host}.{svc}"]))
    return out


def host_lines(recs: list[tuple[str, str, list[str], list[str]]], namespace: str) -> list[tuple[str, list[str]]]:
    """/etc/hosts lines for a pod in ``namespace``."""
    lines = [(ip, names + (short if ns == namespace else [])) for ns, ip, names, short in recs]
    return [("#", ["cluster DNS records (testcluster)"]), *lines] if lines else []


def resolv_conf(namespace: str) -> str:
    """The pod's /etc/resolv.conf for dnsPolicy ClusterFirst. There is no DNS server: the nameserver is
    the pod's own loopback, where nothing listens, so a name missing from /etc/hosts fails at once
    instead of timing out against the host's resolver, which pods cannot reach."""
    return (f"# testcluster: no cluster DNS server; names resolve through /etc/hosts\n"
            f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local\n"
            "nameserver 127.0.0.1\noptions ndots:5\n")
