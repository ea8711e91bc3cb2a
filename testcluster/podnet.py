"""A node's pod network, set up the way the CNI ``bridge`` plugin with ``host-local`` IPAM sets it up on a
real node: one Linux bridge with the gateway address of the node's pod CIDR, and per pod a network
namespace joined to the bridge by a veth pair (host end on the bridge, pod end ``eth0`` with the pod's
IP and a default route via the gateway; ``lo`` up). Pods get their own port space and reach each other,
and the host's addresses on the bridge (the gateway: the API server listens there too), by pod IP.

    net = PodNetwork.create("node-1")            # a free 10.244.<n>.0/24 unless cidr= is given
    ip, netns = net.add_pod(uid)                 # /run/netns/<netns>; the container launcher setns()es into it
    net.remove_pod(uid); net.clear(); net.close()  # clear: every pod's netns and veth; close: the bridge too

Names: bridge ``tcbr-<id>``, host veth ends ``tcv<id><5 hex>``, netns ``tc-<id>-<pod uid[:8]>``, where
``<id>`` (6 hex) is unique to one PodNetwork instance. Only names of exactly these forms are ever touched.
A live network holds an flock on ``/run/testcluster-podnet/<id>.lock``; ``create`` first removes what
belongs to ids whose lock nobody holds (runs that crashed or were killed), under a global lock, so a
crashed test never breaks the next run and concurrent runs (each with its own /24) leave each other alone.

Traffic stays on this machine: nothing here adds NAT, enables forwarding or touches eth0 or other
routes (the only host route added is the bridge's connected /24); the pods' default route ends at the
gateway, where the host does not forward (net.ipv4.ip_forward is 0 on this machine; nothing here sets it). IPs are handed out round-robin (as host-local does) so a freed IP is
not reused at once. Not emulated: NetworkPolicy, IPv6 / dual stack, hostNetwork and hostPort, MTU and
bandwidth settings, kube-proxy (no Service ClusterIPs: see testcluster.clusterdns), traffic between
nodes (each node's bridge is its own island).
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

RUN_DIR = Path("/run/testcluster-podnet")
NETNS_DIR = Path("/run/netns")
POOL = ipaddress.ip_network("10.244.0.0/16")  # where free /24s are looked for (the usual cluster CIDR)
BRIDGE_RE = re.compile(r"^tcbr-([0-9a-f]{6})$")
VETH_RE = re.compile(r"^tcv([0-9a-f]{6})[0-9a-f]{5}$")
NETNS_RE = re.compile(r"^tc-([0-9a-f]{6})-[0-9a-z-]+$")


class NetworkError(RuntimeError):
    """An ``ip`` command failed (the runtime's FailedCreatePodSandBox)."""


def _ip(*args: str, stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _links() -> list[str]:
    return [link["ifname"] for link in json.loads(_ip("-j", "link", "show") or "[]")]


def _netns() -> list[str]:
    try:
        return os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []


@contextmanager
def _global_lock():
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _alive(nid: str) -> bool:
    """Whether some live process holds network ``nid``'s lock (flock is per open file, so this also sees
    other networks of this very process as alive)."""
    try:
        fh = open(RUN_DIR / f"{nid}.lock", "r")
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def _remove_pods(nid: str) -> list[str]:
    """Delete every veth and netns of network ``nid`` (deleting a host veth end deletes its pair); returns
    the links that were there."""
    links = _links()
    for name in links:
        m = VETH_RE.match(name)
        if m and m.group(1) == nid:
            _ip("link", "del", name, check=False)
    for name in _netns():
        m = NETNS_RE.match(name)
        if m and m.group(1) == nid:
            _ip("netns", "del", name, check=False)
    return links


def _remove_id(nid: str) -> None:
    """Delete every veth, netns and the bridge of network ``nid``."""
    if f"tcbr-{nid}" in _remove_pods(nid):
        _ip("link", "del", f"tcbr-{nid}", check=False)


def reap_stale() -> list[str]:
    """Remove the leftovers of pod networks whose owner is gone; returns their ids. Call under _global_lock."""
    ids = set()
    for name in _links():
        m = BRIDGE_RE.match(name) or VETH_RE.match(name)
        if m:
            ids.add(m.group(1))
    for name in _netns():
        m = NETNS_RE.match(name)
        if m:
            ids.add(m.group(1))
    if RUN_DIR.is_dir():
        ids.update(p.stem for p in RUN_DIR.glob("*.lock") if re.fullmatch(r"[0-9a-f]{6}", p.stem))
    stale = sorted(nid for nid in ids if not _alive(nid))
    for nid in stale:
        _remove_id(nid)
        (RUN_DIR / f"{nid}.lock").unlink(missing_ok=True)
    return stale


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for link in json.loads(_ip("-j", "addr", "show") or "[]"):
        for a in link.get("addr_info") or []:
            if a.get("family") == "inet":
                used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "default")
        if dst != "default" and route.get("type", "unicast") == "unicast":
            used.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return used


def free_cidr() -> ipaddress.IPv4Network:
    """The first /24 of 10.244.0.0/16 that no address or route of this machine overlaps."""
    used = _used_networks()
    for net in POOL.subnets(new_prefix=24):
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetworkError(f"no free /24 left in {POOL}")


class PodNetwork:
    """One node's bridge and its pods' namespaces (thread-safe). Build with ``PodNetwork.create``."""

    def __init__(self, nid: str, cidr: ipaddress.IPv4Network, node: str, lock):
        self.id, self.cidr, self.node = nid, cidr, node
        self.bridge = f"tcbr-{nid}"
        hosts = list(cidr.hosts())
        self.gateway = str(hosts[0])
        self._free = [str(h) for h in hosts[1:]]
        self._next = 0
        self._veths = 0
        self._pods: dict[str, tuple[str, str, str]] = {}  # uid -> (ip, netns, host veth)
        self._lock = threading.Lock()
        self._file = lock
        self.closed = False

    @classmethod
    def create(cls, node: str = "node-1", cidr: str | None = None) -> "PodNetwork":
        with _global_lock():
            reap_stale()
            nid = hashlib.sha256(f"{node}:{os.getpid()}:{time.time_ns()}:{os.urandom(8).hex()}".encode()
                                 ).hexdigest()[:6]
            lock = open(RUN_DIR / f"{nid}.lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                if cidr is None:
                    net = free_cidr()
                else:
                    net = ipaddress.ip_network(cidr)
                    taken = [u for u in _used_networks() if net.overlaps(u)]
                    if taken:
                        raise NetworkError(f"pod CIDR {net} overlaps {taken[0]}, already on this machine")
                    if net.num_addresses < 4:
                        raise NetworkError(f"pod CIDR {net} is too small")
                lock.write(json.dumps({"node": node, "pid": os.getpid(), "cidr": str(net)}))
                lock.flush()
                self = cls(nid, net, node, lock)
                _ip("link", "add", self.bridge, "type", "bridge")
                _ip("addr", "add", f"{self.gateway}/{net.prefixlen}", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            except BaseException:
                _remove_id(nid)
                (RUN_DIR / f"{nid}.lock").unlink(missing_ok=True)
                lock.close()
                raise
        atexit.register(self.close)  # a clean interpreter exit cleans up even without close()
        return self

    def __repr__(self) -> str:
        return f"PodNetwork({self.node!r}, {str(self.cidr)!r}, bridge={self.bridge!r})"

    # ---- pods ------------------------------------------------------------------------------------------------

    def add_pod(self, uid: str) -> tuple[str, str]:
        """A netns with ``eth0`` on the bridge; returns (pod IP, netns name: /run/netns/<name>)."""
        with self._lock:
            if self.closed:
                raise NetworkError(f"{self!r} is closed")
            if uid in self._pods:
                return self._pods[uid][:2]
            taken = {ip for ip, _, _ in self._pods.values()}
            for step in range(len(self._free)):  # round-robin from after the last one handed out
                ip = self._free[(self._next + step) % len(self._free)]
                if ip not in taken:
                    self._next = (self._next + step + 1) % len(self._free)
                    break
            else:
                raise NetworkError(f"no IP addresses available in range set: {self.cidr}")
            netns = f"tc-{self.id}-{uid[:8].lower()}"
            if any(ns == netns for _, ns, _ in self._pods.values()) or not NETNS_RE.match(netns):
                netns = f"tc-{self.id}-{self._veths:08x}"
            veth = f"tcv{self.id}{self._veths % 0x100000:05x}"
            self._veths += 1
            self._pods[uid] = (ip, netns, veth)
        try:
            _ip("netns", "add", netns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", netns, "-batch", "-", stdin=f"addr add {ip}/{self.cidr.prefixlen} dev eth0\n"
                                                   "link set eth0 up\nlink set lo up\n"
                                                   f"route add default via {self.gateway}\n")
        except NetworkError:
            self.remove_pod(uid)
            raise
        if self.closed:  # closed while this was being built: nothing may outlive close()
            _ip("link", "del", veth, check=False)
            _ip("netns", "del", netns, check=False)
            raise NetworkError(f"{self!r} is closed")
        return ip, netns

    def remove_pod(self, uid: str) -> None:
        """Tear down the pod's netns and veth (its processes should be gone); its IP becomes free."""
        with self._lock:
            entry = self._pods.pop(uid, None)
        if entry is not None:
            _, netns, veth = entry
            _ip("link", "del", veth, check=False)
            _ip("netns", "del", netns, check=False)

    def pod_ip(self, uid: str) -> str | None:
        entry = self._pods.get(uid)
        return entry[0] if entry else None

    def clear(self) -> None:
        """Delete every pod's netns and veth (found on the machine, not only the ones recorded); keeps the
        bridge."""
        with self._lock:
            self._pods.clear()
            _remove_pods(self.id)

    def close(self) -> None:
        """Delete every netns and veth of this network and the bridge; idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._pods.clear()
        with _global_lock():
            _remove_id(self.id)
            (RUN_DIR / f"{self.id}.lock").unlink(missing_ok=True)
            self._file.close()
        atexit.unregister(self.close)

    def leftovers(self) -> list[str]:
        """What of this network still exists on the machine (for tests: empty after close)."""
        mine = lambda m: m is not None and m.group(1) == self.id  # noqa: E731
        return ([n for n in _links() if mine(BRIDGE_RE.match(n) or VETH_RE.match(n))]
                + [f"netns/{n}" for n in _netns() if mine(NETNS_RE.match(n))])

    def __enter__(self) -> "PodNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
