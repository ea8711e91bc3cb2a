"""The sandbox launcher: a real process in its own mount and UTS namespace that sees the volumes at their
mount paths, runs as the pod's user, and leaves the host untouched."""
from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

from testcluster.sandbox import Mount, Spec, StartError, start

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root (mount namespaces)")


def run(tmp: Path, code: str, **kw) -> tuple[int, str]:
    log = tmp / "log"
    log.write_text("")
    spec = Spec(argv=kw.pop("argv", ["python3", "-c", textwrap.dedent(code)]), env=kw.pop("env", {"PATH": PATH}),
                scratch=str(tmp / f"rootfs-{os.urandom(3).hex()}"), **kw)
    proc = start(spec, str(log))
    return proc.wait(timeout=60), log.read_text()


def test_volumes_are_seen_at_their_mount_paths(tmp_path):
    cm = tmp_path / "cm"
    cm.mkdir()
    (cm / "key").write_text("value")
    pvc = tmp_path / "pvc"
    pvc.mkdir()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n127.0.0.1\tjob-0.svc.ns.svc.cluster.local job-0\n")
    term = tmp_path / "termination-log"
    term.write_text("")
    assert not Path("/run/testcluster-secrets").exists()
    code, log = run(tmp_path, """
        import os, socket
        print(open("/etc/branchmerge/key").read() + open("/var/run/testcluster-secrets/x/key").read())
        try:
            open("/etc/branchmerge/new", "w")
        except OSError as err:
            print("ro", err.errno)
        open("/mnt/pvc/claim/out.txt", "w").write("written")
        open("/dev/termination-log", "w").write("done")
        print(socket.gethostname(), socket.gethostbyname("job-0.svc.ns.svc.cluster.local"))
        print(sorted(os.listdir("/tmp")), os.getcwd())
    """, mounts=[Mount(str(cm), "/etc/branchmerge", True), Mount(str(pvc), "/mnt/pvc/claim"),
                 Mount(str(cm), "/var/run/testcluster-secrets/x", True),  # /var/run is a symlink to /run
                 Mount(str(hosts), "/etc/hosts", True), Mount(str(term), "/dev/termination-log")],
        hostname="job-0", cwd="/work/dir")
    assert code == 0, log
    lines = log.splitlines()
    assert lines[0] == "valuevalue" and lines[1] == "ro 30"  # EROFS
    assert lines[2] == "job-0 127.0.0.1"
    assert lines[3] == "[] /work/dir"  # a fresh /tmp; the working directory created like runc does
    assert (pvc / "out.txt").read_text() == "written" and term.read_text() == "done"
    assert not Path("/etc/branchmerge").exists() and not Path("/mnt/pvc/claim").exists()  # host untouched
    assert not Path("/work/dir").exists()
    assert not Path("/run/testcluster-secrets").exists()  # symlinks resolved inside the container's root


def test_user_groups_and_privileges_are_dropped(tmp_path):
    code, log = run(tmp_path, """
        import os
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(os.getuid(), os.getgid(), os.getgroups(), status["NoNewPrivs"].strip(), status["CapBnd"].strip())
    """, uid=1000, gid=3000, groups=[2000], no_new_privs=True, cap_drop=["ALL"])
    assert code == 0, log
    assert log.split() == ["1000", "3000", "[2000]", "1", "0000000000000000"]


def test_added_capabilities_stay_in_the_bounding_set_only(tmp_path):
    """drop ALL + add IPC_LOCK keeps IPC_LOCK (bit 14) in the bounding set; a non-root process still holds
    no capability (no ambient set: what containerd and CRI-O do, kubernetes/kubernetes#56374)."""
    code, log = run(tmp_path, """
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(status["CapBnd"].strip(), status["CapEff"].strip())
    """, uid=1000, gid=1000, no_new_privs=True, cap_drop=["ALL"], cap_add=["IPC_LOCK"])
    assert code == 0, log
    assert log.split() == [f"{1 << 14:016x}", "0000000000000000"]


def test_read_only_root_filesystem(tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    code, log = run(tmp_path, """
        for path in ("/usr/x", "/tmp/x", "/etc/x", "/vol/x"):
            try:
                open(path, "w").write("x")
                print(path, "ok")
            except OSError as err:
                print(path, err.errno)
    """, mounts=[Mount(str(vol), "/vol")], read_only_root=True)
    assert code == 0, log
    assert log.split("\n")[:4] == ["/usr/x 30", "/tmp/x 30", "/etc/x 30", "/vol/x ok"]


def test_writes_to_the_root_stay_in_the_container(tmp_path):
    marker = f"/usr/testcluster-{os.urandom(4).hex()}"
    code, log = run(tmp_path, f"open({marker!r}, 'w').write('x'); print(open({marker!r}).read())")
    assert code == 0 and log.strip() == "x", log
    assert not Path(marker).exists()


def test_env_and_exit_code_pass_through(tmp_path):
    code, log = run(tmp_path, "", argv=["sh", "-c", "echo $GREETING; exit 7"], env={"PATH": PATH, "GREETING": "hi"})
    assert (code, log) == (7, "hi\n")


def test_a_missing_executable_is_a_start_error(tmp_path):
    with pytest.raises(StartError) as err:
        run(tmp_path, "", argv=["no-such-binary"])
    assert 'exec: "no-such-binary": executable file not found in $PATH' in err.value.message
    with pytest.raises(StartError):
        run(tmp_path, "", argv=["python3"], uid=1000, mounts=[Mount("/nonexistent-host-dir", "/x")])


def test_killing_the_process_group_stops_children(tmp_path):
    log = tmp_path / "log"
    spec = Spec(argv=["sh", "-c", "sleep 300 & echo $!; wait"], env={"PATH": PATH}, scratch=str(tmp_path / "r"))
    proc = start(spec, str(log))
    deadline = time.time() + 10
    while not log.read_text().strip() and time.time() < deadline:
        time.sleep(0.05)
    child = int(log.read_text().split()[0])
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        try:  # reaped by init only if reparented: poll its state
            if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the container's child survived SIGTERM to the process group")


def test_spec_round_trips_as_json(tmp_path):
    spec = Spec(argv=["a"], env={"K": "V"}, scratch="/s", mounts=[Mount("/a", "/b", True)], uid=5, groups=[1])
    assert Spec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json())["mounts"] == [{"source": "/a", "target": "/b", "read_only": True}]


def test_a_container_joins_its_pods_network_namespace(tmp_path):
    """Two containers of one pod share its netns (one listens, the other connects over lo); privileges
    are still dropped after the setns; a container without ``netns`` stays on the host's network."""
    from testcluster.podnet import PodNetwork

    with PodNetwork.create("sandbox-test") as net:
        ip, netns = net.add_pod("0123abcd-0000")
        listener = Spec(argv=["python3", "-c", textwrap.dedent("""
            import socket
            s = socket.socket(); s.bind(("127.0.0.1", 29500)); s.listen(); print("up", flush=True)
            c, _ = s.accept(); c.sendall(b"same pod")
        """)], env={"PATH": PATH}, scratch=str(tmp_path / "a"), netns=f"/run/netns/{netns}", uid=1000, gid=1000)
        proc = start(listener, str(tmp_path / "a.log"))
        deadline = time.time() + 20
        while "up" not in (tmp_path / "a.log").read_text():
            assert time.time() < deadline and proc.poll() is None, (tmp_path / "a.log").read_text()
            time.sleep(0.05)
        code, log = run(tmp_path, """
            import os, socket
            print(os.getuid(), sorted(os.listdir("/sys/class/net")), socket.create_connection(("127.0.0.1", 29500),
                  timeout=5).recv(64).decode())
        """, netns=f"/run/netns/{netns}", uid=1000, gid=1000)
        assert proc.wait(timeout=20) == 0
        assert code == 0 and log.strip() == "1000 ['eth0', 'lo'] same pod", log
        code, log = run(tmp_path, "import os; print(sorted(os.listdir('/sys/class/net')))")
        assert code == 0 and log.strip() == str(sorted(os.listdir("/sys/class/net")))  # the host's network
