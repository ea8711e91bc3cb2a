"""Sandbox containment: network, infinite loop, memory bomb, fork bomb, writes outside the work dir, secrets.

Each OS layer is also checked with the audit hook switched off, and the hook alone with the network
namespace off, so neither layer hides a hole in the other.
"""
from __future__ import annotations

import os
import socket
import threading
import time

import psutil
import pytest

from branchmerge.trainer.grading.sandbox import Limits, network_namespaces_available, run_python

CONNECT = """
import socket
s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
s.sendall(b"leak")
print("connected")
"""


@pytest.fixture
def listener():
    """A real TCP server on the host's loopback that records whether anybody connected."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            seen.append(conn.recv(16))
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()[1], seen
    stop.set()
    thread.join(2)
    srv.close()


def test_listener_is_reachable_without_sandbox(listener):
    port, seen = listener
    socket.create_connection(("127.0.0.1", port), timeout=2).sendall(b"hi")
    time.sleep(0.3)
    assert seen == [b"hi"]


@pytest.mark.parametrize("limits", [Limits(), Limits(audit_hook=False), Limits(isolate_network=False)],
                         ids=["all-layers", "netns-only", "hook-only"])
def test_network_attempt_fails(listener, limits):
    port, seen = listener
    if not limits.audit_hook and not network_namespaces_available():
        pytest.skip("no network namespaces here")
    result = run_python(CONNECT.format(port=port), limits=limits)
    time.sleep(0.3)
    assert result.returncode != 0 and "connected" not in result.stdout
    assert seen == []
    assert ("Network is unreachable" in result.stderr) if not limits.audit_hook else "sandbox:" in result.stderr


def test_infinite_loop_is_killed_on_time():
    result = run_python("while True:\n    pass\n", limits=Limits(timeout_seconds=1))
    assert result.timed_out and result.returncode is None and result.wall_seconds < 5


def test_memory_bomb_hits_the_address_space_limit():
    result = run_python("x = bytearray(2 * 1024 ** 3)\nprint('allocated')", limits=Limits(memory_mb=256))
    assert result.returncode != 0 and "MemoryError" in result.stderr and "allocated" not in result.stdout
    grow = run_python("x = []\nwhile True:\n    x.append(' ' * 10_000_000)", limits=Limits(memory_mb=256))
    assert grow.returncode != 0 and not grow.timed_out


@pytest.mark.parametrize("hook", [True, False], ids=["hook", "rlimit-only"])
def test_fork_bomb_is_contained(hook):
    before = {p.pid for p in psutil.process_iter()}
    bomb = "import os\nwhile True:\n    os.fork()\n"
    result = run_python(bomb, limits=Limits(timeout_seconds=2, audit_hook=hook))
    assert result.returncode != 0 or result.timed_out
    time.sleep(0.5)
    alive = [p for p in psutil.process_iter(["status", "cmdline"]) if p.pid not in before
             and p.info["status"] != psutil.STATUS_ZOMBIE and "runner.py" in " ".join(p.info["cmdline"] or [])]
    assert alive == []  # the whole session was killed
    if hook:
        assert "os.fork is not allowed" in result.stderr


@pytest.mark.parametrize("hook", [True, False], ids=["hook", "os-only"])
def test_cannot_write_outside_its_dir(tmp_path, hook):
    target = tmp_path / "pwned.txt"
    program = (f"open({str(target)!r}, 'w').write('x')\n"
               "open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n")
    result = run_python(program, limits=Limits(audit_hook=hook))
    if not hook and os.getuid() != 0:
        pytest.skip("without the hook only a root parent (dropping to nobody) keeps the child out")
    assert not target.exists()
    assert result.returncode != 0 and "inside" not in result.stdout
    inside = run_python("open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n")
    assert inside.ok and inside.stdout.strip() == "fine"


def test_environment_is_empty_and_secrets_do_not_leak(monkeypatch):
    monkeypatch.setenv("BRANCHMERGE_API_KEY", "sk-never-inside")
    result = run_python("import os\nprint(sorted(os.environ))\nprint(open(f'/proc/{os.getppid()}/environ').read())")
    assert "sk-never-inside" not in result.stdout
    assert result.stdout.splitlines()[0] in ("[]", "['LC_CTYPE']")  # Python's own locale coercion (PEP 538)


def test_escape_hatches_are_blocked():
    for program in ("import ctypes", "import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                    "import os\nos.kill(os.getppid(), 9)"):
        result = run_python(program)
        assert result.returncode != 0 and "sandbox:" in result.stderr, program


def test_output_is_bounded_by_file_size_limit():
    result = run_python("while True:\n    print('x' * 1000)", limits=Limits(timeout_seconds=5, file_size_mb=1))
    assert result.returncode != 0 and len(result.stdout) <= 1024 * 1024
