"""Run model-written Python in a confined child process.

Layers (each one alone would not be enough):
- a separate process in its own session (the whole group is killed on timeout), an EMPTY environment
  (no secrets, no proxies), ``python -I`` (no user site, no PYTHON* variables), a fresh temp work dir as cwd;
- a new network namespace (``unshare(CLONE_NEWNET)``; with user namespaces when not root): no route anywhere,
  not even to the host's loopback. If the kernel refuses, an audit hook still blocks sockets;
- as root, the child drops to ``nobody`` when the interpreter is readable by it (RLIMIT_NPROC then counts);
- resource limits: address space, CPU seconds, file size, open files, processes, no core dumps;
- a Python audit hook installed before the program runs: no sockets, subprocesses, fork/exec, ctypes,
  kill, rlimit changes, writes outside the work dir, or reading other processes' /proc entries;
- stdin/stdout/stderr are files (no pipe deadlocks; output bounded by RLIMIT_FSIZE) read back after the run.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUNNER = Path(__file__).with_name("_sandbox_runner.py")
SANDBOX_PYTHON_ENV = "BRANCHMERGE_SANDBOX_PYTHON"
NOBODY = 65534


@dataclass
class Limits:
    timeout_seconds: float = 10.0
    """Wall-clock limit of one run (CPU limit is the same, rounded up)."""
    memory_mb: int = 512
    file_size_mb: int = 16
    extra_processes: int = 4
    isolate_network: bool = True
    """False keeps only the audit hook (the tests use it to check that layer alone)."""
    audit_hook: bool = True
    """False keeps only the OS layers (the tests use it to check them alone); always on in real use."""


@dataclass
class RunResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_seconds: float
    network: str
    """How the network was blocked: netns or audit-hook."""
    results: list[dict] = field(default_factory=list)
    """Functional mode: one dict per case ({ok, value} or {ok: False, error})."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _world_executable(path: Path) -> bool:
    """Can ``nobody`` run this interpreter (every parent dir searchable, the file readable/executable)?"""
    path = path.resolve()
    for parent in [*reversed(path.parents)]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    mode = path.stat().st_mode
    return bool(mode & stat.S_IXOTH and mode & stat.S_IROTH)


@functools.lru_cache(maxsize=1)
def sandbox_python() -> tuple[str, bool]:
    """(interpreter, drop_to_nobody). The program only needs the standard library."""
    override = os.environ.get(SANDBOX_PYTHON_ENV)
    if override:
        return override, os.getuid() == 0 and _world_executable(Path(override))
    if os.getuid() != 0:
        return sys.executable, False
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(candidate).exists() and _world_executable(Path(candidate)):
            return candidate, True
    return sys.executable, False  # root without a world-readable python: the audit hook guards writes


_PROBE = ("import ctypes, ctypes.util, sys\n"
          "libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')\n"
          "sys.exit(0 if libc.unshare(0x40000000) == 0 or libc.unshare(0x50000000) == 0 else 1)\n")


@functools.lru_cache(maxsize=1)
def network_namespaces_available() -> bool:
    python, _ = sandbox_python()
    try:
        return subprocess.run([python, "-I", "-c", _PROBE], env={}, timeout=30,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_python(source: str, *, stdin: str = "", limits: Limits | None = None, fn_name: str | None = None,
               cases: list[list[Any]] | None = None) -> RunResult:
    """Run ``source`` as a script (stdin -> stdout), or, with ``fn_name``, call it on each of ``cases``."""
    limits = limits or Limits()
    python, drop = sandbox_python()
    netns = limits.isolate_network and network_namespaces_available()
    functional = fn_name is not None
    base = Path(tempfile.mkdtemp(prefix="bm-sandbox-"))
    try:
        io_dir, work = base / "io", base / "work"
        io_dir.mkdir(mode=0o700)
        work.mkdir(mode=0o700)
        if drop:
            os.chmod(base, 0o711)
            os.chown(work, NOBODY, NOBODY)
        (io_dir / "solution.py").write_text(source)
        # a private copy: run from the package folder, an old interpreter would put it first on sys.path,
        # where this package's math.py/code.py would shadow the standard library's
        runner = io_dir / "runner.py"
        shutil.copyfile(RUNNER, runner)
        (io_dir / "stdin").write_text(stdin)
        n_cases = len(cases or [])
        wall = limits.timeout_seconds * (max(1, n_cases) if functional else 1) + (1.0 if functional else 0.0)
        with open(io_dir / "stdin", "rb") as f_in, open(io_dir / "stdout", "wb") as f_out, \
                open(io_dir / "stderr", "wb") as f_err, open(io_dir / "result", "wb") as f_res:
            cfg = {"program": str(io_dir / "solution.py"), "isolate_network": limits.isolate_network,
                   "require_netns": netns, "audit_hook": limits.audit_hook, "drop_to_nobody": drop, "memory_mb": limits.memory_mb,
                   "cpu_seconds": int(wall) + 1, "file_size_mb": limits.file_size_mb,
                   "extra_processes": limits.extra_processes, "mode": "functional" if functional else "script",
                   "fn_name": fn_name, "cases": cases or [], "case_timeout": limits.timeout_seconds,
                   "result_fd": f_res.fileno()}
            (io_dir / "config.json").write_text(json.dumps(cfg))
            started = time.monotonic()
            proc = subprocess.Popen([python, "-I", "-B", str(runner), str(io_dir / "config.json")],
                                    stdin=f_in, stdout=f_out, stderr=f_err, cwd=work, env={},
                                    start_new_session=True, pass_fds=(f_res.fileno(),))
            timed_out = False
            try:
                proc.wait(timeout=wall)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the whole session, stragglers included
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
            elapsed = time.monotonic() - started
        cap = limits.file_size_mb * 1024 * 1024
        results = []
        if functional:
            for line in _read_capped(io_dir / "result", cap).splitlines():
                try:
                    results.append(json.loads(line))
                except ValueError:
                    break
        code = proc.returncode
        if code is not None and code < 0 and -code == signal.SIGXCPU:
            timed_out = True
        return RunResult(returncode=None if timed_out else code, stdout=_read_capped(io_dir / "stdout", cap),
                         stderr=_read_capped(io_dir / "stderr", 64 * 1024), timed_out=timed_out,
                         wall_seconds=elapsed, network="netns" if netns else "audit-hook", results=results)
    finally:
        shutil.rmtree(base, ignore_errors=True)
