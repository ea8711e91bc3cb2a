"""The pod network plumbing on its own: a bridge per network, a netns + veth per pod, leftovers of a
killed run removed by the next one, live networks of other runs left alone."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from testcluster import podnet
from testcluster.podnet import NetworkError, PodNetwork

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def in_netns(netns: str, code: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, check=True, timeout=30).stdout


def test_pods_get_addresses_on_the_bridge_and_reach_each_other():
    with PodNetwork.create("node-x") as net:
        a_ip, a_ns = net.add_pod("aaaaaaaa-1111")
        b_ip, b_ns = net.add_pod("bbbbbbbb-2222")
        assert a_ns == f"tc-{net.id}-aaaaaaaa" and {a_ip, b_ip} <= set(map(str, net.cidr.hosts()))
        assert net.gateway == str(next(net.cidr.hosts())) and len({a_ip, b_ip, net.gateway}) == 3
        assert net.add_pod("aaaaaaaa-1111") == (a_ip, a_ns)  # idempotent
        out = in_netns(a_ns, f"""
            import subprocess
            print(subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True,
                                 text=True).stdout.split()[3])
            print(subprocess.run(["ip", "route", "show", "default"], capture_output=True, text=True).stdout.strip())
        """)
        assert out.splitlines() == [f"{a_ip}/{net.cidr.prefixlen}", f"default via {net.gateway} dev eth0"]
        # b listens, a connects to it by IP
        server = subprocess.Popen(["ip", "netns", "exec", b_ns, sys.executable, "-c", textwrap.dedent("""
            import socket
            s = socket.socket(); s.bind(("0.0.0.0", 29500)); s.listen(); print("up", flush=True)
            c, addr = s.accept(); c.sendall(addr[0].encode())
        """)], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "up"
            got = in_netns(a_ns, f"import socket; print(socket.create_connection(('{b_ip}', 29500), 5)"
                                 ".recv(64).decode())")
            assert got.strip() == a_ip
        finally:
            server.wait(10)
        net.remove_pod("aaaaaaaa-1111")
        assert f"netns/{a_ns}" not in net.leftovers() and f"netns/{b_ns}" in net.leftovers()
        c_ip, _ = net.add_pod("cccccccc-3333")
        assert c_ip not in (a_ip, b_ip)  # round-robin: a freed IP is not handed out again at once
    assert net.leftovers() == []


def test_an_overlapping_cidr_is_refused():
    with PodNetwork.create("node-x") as net:
        with pytest.raises(NetworkError, match="overlaps"):
            PodNetwork.create("node-y", str(net.cidr))
        with PodNetwork.create("node-y") as other:  # a free /24 of its own
            assert not other.cidr.overlaps(net.cidr) and other.cidr.subnet_of(ipaddress.ip_network("10.244.0.0/16"))


def test_a_killed_run_is_cleaned_up_by_the_next_and_live_ones_are_left_alone():
    code = textwrap.dedent("""
        import os, signal, sys
        sys.path.insert(0, sys.argv[1])
        from testcluster.podnet import PodNetwork
        net = PodNetwork.create("crashed")
        net.add_pod("deadbeef-0000")
        print(net.id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no atexit
    """)
    proc = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead = proc.stdout.strip()
    left = [n for n in podnet._links() if dead in n] + [n for n in podnet._netns() if dead in n]
    assert len(left) == 3  # bridge, veth, netns
    with PodNetwork.create("live") as live:
        live.add_pod("11111111-0000")
        with PodNetwork.create("next") as nxt:  # the next run: the dead one's things are gone
            assert not [n for n in podnet._links() + podnet._netns() if dead in n]
            assert not (podnet.RUN_DIR / f"{dead}.lock").exists()
            assert len(live.leftovers()) == 3 and nxt.id != live.id  # the live one is untouched
    assert live.leftovers() == [] and nxt.leftovers() == []
