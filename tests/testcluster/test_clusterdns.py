"""Cluster DNS records from Services and pods (pure): which pods are endpoints, at which IPs."""
from __future__ import annotations

from testcluster.clusterdns import host_lines, records


def pod(name, ip, *, ready=True, phase="Running", hostname=None, subdomain=None, created="2025-01-01T00:00:00Z",
        deleting=False, labels=None):
    meta = {"name": name, "namespace": "ns", "labels": labels or {"app": "x"}, "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-02T00:00:00Z"
    spec = {k: v for k, v in (("hostname", hostname), ("subdomain", subdomain)) if v}
    status = {"phase": phase, "podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    return {"metadata": meta, "spec": spec, "status": status}


def svc(**spec):
    return {"spec": {"selector": {"app": "x"}, **spec}}


def as_dict(recs):
    out = {}
    for ns, ip, names, short in recs:
        out.setdefault(names[0], []).append(ip)
    return out


def test_endpoints_and_records():
    pods = {("ns", p["metadata"]["name"]): p for p in [
        pod("old", "10.0.0.2", hostname="h-0", subdomain="headless", created="2025-01-01T00:00:00Z"),
        pod("new", "10.0.0.3", hostname="h-1", subdomain="headless", created="2025-01-01T00:00:05Z"),
        pod("unready", "10.0.0.4", ready=False, hostname="h-2", subdomain="headless"),
        pod("done", "10.0.0.5", phase="Succeeded", hostname="h-3", subdomain="headless"),
        pod("going", "10.0.0.6", deleting=True, hostname="h-4", subdomain="headless"),
        pod("other", "10.0.0.7", labels={"app": "y"}, hostname="h-5", subdomain="headless"),
        pod("noip", "", hostname="h-6", subdomain="headless")]}
    services = {("ns", "headless"): svc(clusterIP="None"), ("ns", "web"): svc(clusterIP="10.96.0.9"),
                ("ns", "eager"): svc(clusterIP="None", publishNotReadyAddresses=True),
                ("ns", "manual"): {"spec": {"clusterIP": "None"}}, ("ns", "ext"): {"spec": {"type": "ExternalName"}}}
    got = as_dict(records(services, pods))
    assert got["headless.ns.svc.cluster.local"] == ["10.0.0.2", "10.0.0.3"]  # ready, live endpoints
    assert got["h-0.headless.ns.svc.cluster.local"] == ["10.0.0.2"]
    assert "h-2.headless.ns.svc.cluster.local" not in got and "h-3.headless.ns.svc.cluster.local" not in got
    assert got["web.ns.svc.cluster.local"] == ["10.0.0.2"]  # no kube-proxy: one endpoint, the oldest
    # publishNotReadyAddresses: not-ready and terminating pods too (never terminal ones); the per-pod
    # names need the pod's subdomain to be this Service
    assert sorted(got["eager.ns.svc.cluster.local"]) == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.6"]
    assert not [n for n in got if n.endswith(".eager.ns.svc.cluster.local")]
    assert not [n for n in got if n.startswith(("manual.", "ext."))]
    lines = dict((" ".join(names), ip) for ip, names in host_lines(records(services, pods), "ns")[1:])
    assert lines["h-0.headless.ns.svc.cluster.local h-0.headless.ns.svc h-0.headless.ns h-0.headless"] == "10.0.0.2"
    other_ns = [names for _, names in host_lines(records(services, pods), "elsewhere")[1:]]
    assert all("h-0.headless" not in names and "web" not in names for names in other_ns)  # short names: own ns only
