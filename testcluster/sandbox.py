"""Run one container's process the way a container runtime would, on this machine: (argv, env, mounts,
user, hostname, /etc/hosts) -> a running process that sees the real paths.

``start(spec, log)`` runs this file as a launcher (``python -I -S sandbox.py spec.json``, as root). The
launcher, using only the standard library and libc:
- joins the pod's network namespace (``spec.netns``, made by testcluster.podnet: every container of a pod
  shares it, as they share the pod sandbox's) with setns, before anything else;
- enters a new mount and UTS namespace (mounts stay private to the container; its own hostname);
- builds the container's root: a copy-on-write overlay of this machine's ``/`` (writes land in a tmpfs
  and vanish with the container), a fresh ``/dev`` (tmpfs with null, zero, full, random, urandom, tty, a
  new devpts, the fd/stdio links), ``/proc`` bound from the host, ``/sys`` a fresh read-only sysfs of
  the pod's network namespace (its /sys/class/net lists lo and eth0) with the host's /sys/fs/cgroup
  bound in (without a netns: the host's /sys bound), an empty ``/tmp``;
- bind-mounts each mount at its target (read-only ones remounted read-only; missing targets are created
  in the overlay, never on the host), then remounts the root read-only for ``readOnlyRootFilesystem``;
- chroots into it, changes to the working directory, sets the hostname, drops privileges like
  ``setpriv --reuid --regid --groups --no-new-privs --bounding-set=-all``: bounding-set drops, no_new_privs,
  setgroups/setresgid/setresuid; then execs argv[0] looked up in the container's ``PATH``.
A failure before the exec (a missing executable, a mount that cannot be made) comes back through a
close-on-exec pipe as (reason, message) and ``start`` raises ``StartError``: the runtime's StartError.

Not emulated: PID and IPC namespaces (processes see the host's), cgroups (no CPU/memory limits, no OOM
killer), seccomp and AppArmor profiles, capability *sets* for root beyond dropping from the bounding set
(a root container keeps all), user namespaces, the image's own filesystem (the root is this machine's;
``/etc/resolv.conf`` is the host's unless the kubelet mounts one), ``/dev/shm`` size limits, separate stdout/stderr streams (both go to one log file, untimestamped).
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
from dataclasses import asdict, dataclass, field

# libc constants (linux/mount.h, sched.h, prctl.h)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWNET = 0x00020000, 0x04000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
CAPS = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
        "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
        "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
        "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
        "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
        "CHECKPOINT_RESTORE"]
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
EXIT_START_ERROR = 128  # what containerd reports for a container that never started


class StartError(RuntimeError):
    """The container could not start (the runtime's StartError / RunContainerError)."""

    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message
        super().__init__(f"{reason}: {message}")


@dataclass
class Mount:
    source: str            # a host folder or file
    target: str            # the absolute path inside the container
    read_only: bool = False


@dataclass
class Spec:
    argv: list[str]
    env: dict[str, str]
    scratch: str                      # a host folder the launcher may mount its overlay on (per container)
    cwd: str = "/"
    mounts: list[Mount] = field(default_factory=list)
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)   # supplementary groups (fsGroup, supplementalGroups)
    no_new_privs: bool = False
    cap_drop: list[str] = field(default_factory=list)  # "ALL" or capability names (without CAP_)
    cap_add: list[str] = field(default_factory=list)   # kept in the bounding set even under "ALL" (as runc)
    read_only_root: bool = False
    hostname: str = ""
    netns: str = ""                   # a network namespace to join (/run/netns/<name>); "": the host's

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        doc = json.loads(text)
        doc["mounts"] = [Mount(**m) for m in doc.get("mounts", [])]
        return cls(**doc)


# ---- the caller's side ------------------------------------------------------------------------------------

def start(spec: Spec, log_path: str, *, spec_path: str | None = None):
    """Start the container; returns the ``subprocess.Popen`` (its own session: kill the process group).
    Blocks until the launcher has exec'd the command (milliseconds) or failed (raises StartError)."""
    import subprocess

    spec_path = spec_path or os.path.join(spec.scratch + ".json")
    os.makedirs(spec.scratch, exist_ok=True)
    with open(spec_path, "w") as fh:
        fh.write(spec.to_json())
    read_fd, write_fd = os.pipe()
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), spec_path, str(write_fd)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_fd,),
                start_new_session=True, env={}, cwd="/")
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read()  # EOF: the exec closed the pipe (or the launcher died)
    if report:
        proc.wait()
        doc = json.loads(report)
        raise StartError(doc["reason"], doc["message"])
    return proc


# ---- the launcher (runs as root, in the new namespaces) -------------------------------------------------

_libc = None


def _call(name: str, *args) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{tuple(a.decode() if isinstance(a, bytes) else a for a in args)}: "
                           f"{os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def _in_root(root: str, path: str) -> str:
    """``path`` inside ``root`` with every symlink resolved *within* root (like runc's securejoin): an
    absolute link such as /var/run -> /run must not lead out to the host's /run."""
    parts = [p for p in path.split("/") if p and p != "."]
    current, hops = root, 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = os.path.dirname(current) if current != root else root
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            hops += 1
            if hops > 40:
                raise OSError(40, f"too many levels of symbolic links: {path}")
            link = os.readlink(candidate)
            parts = [p for p in link.split("/") if p and p != "."] + parts
            if link.startswith("/"):
                current = root
            continue
        current = candidate
    return current


def _mkpoint(path: str, like: str | None = None) -> None:
    """A mount point for ``like``: a file for a file, else a folder (created inside the overlay)."""
    if like is not None and not os.path.isdir(like):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.lexists(path):
            open(path, "a").close()
    else:
        os.makedirs(path, exist_ok=True)


def _bind(source: str, target: str, read_only: bool) -> None:
    _mkpoint(target, source)
    _mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _which(name: str, env: dict[str, str]) -> str | None:
    if "/" in name:
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    for folder in env.get("PATH", "").split(":"):
        candidate = os.path.join(folder or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _setup_root(spec: Spec) -> str:
    scratch = spec.scratch
    os.makedirs(scratch, exist_ok=True)
    _mount("tmpfs", scratch, "tmpfs", 0, "mode=0755")
    for d in ("upper", "work", "root"):
        os.mkdir(os.path.join(scratch, d))
    root = os.path.join(scratch, "root")
    _mount("overlay", root, "overlay", 0, f"lowerdir=/,upperdir={scratch}/upper,workdir={scratch}/work")
    inside = lambda p: _in_root(root, p)  # noqa: E731
    # /dev: a fresh tmpfs with the usual device nodes, as runc sets it up
    _mount("tmpfs", inside("/dev"), "tmpfs", MS_NOSUID, "mode=0755")
    for dev in DEVICES:
        _bind(f"/dev/{dev}", inside(f"/dev/{dev}"), False)
    os.mkdir(inside("/dev/pts"))
    _mount("devpts", inside("/dev/pts"), "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    os.symlink("pts/ptmx", inside("/dev/ptmx"))
    os.symlink("/proc/self/fd", inside("/dev/fd"))
    for i, stream in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", inside(f"/dev/{stream}"))
    os.mkdir(inside("/dev/shm"), 0o1777)
    _mount("/proc", inside("/proc"), None, MS_BIND | MS_REC)
    try:  # a sysfs mounted from inside the pod's netns shows that namespace's interfaces
        if not spec.netns:
            raise OSError("no network namespace of its own")
        _mount("sysfs", inside("/sys"), "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
        if os.path.isdir("/sys/fs/cgroup"):  # separate mounts on the host: what the runtime mounts there
            _mount("/sys/fs/cgroup", inside("/sys/fs/cgroup"), None, MS_BIND | MS_REC)
    except OSError:
        _mount("/sys", inside("/sys"), None, MS_BIND | MS_REC)
    targets = {os.path.normpath(m.target) for m in spec.mounts}
    tmp_fresh = "/tmp" not in targets
    if tmp_fresh:  # the image's /tmp is empty; the host's must not show through
        _mount("tmpfs", inside("/tmp"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    # parents before children (a volume inside another volume's folder)
    for m in sorted(spec.mounts, key=lambda m: os.path.normpath(m.target).count("/")):
        _bind(m.source, inside(m.target), m.read_only)
    cwd = inside(spec.cwd or "/")
    if not os.path.isdir(cwd):
        os.makedirs(cwd)  # runc creates a missing working directory
    if spec.read_only_root:
        _mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        if tmp_fresh:
            _mount(None, inside("/tmp"), None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    return root


def _drop_privileges(spec: Spec) -> None:
    drop = {c.upper().removeprefix("CAP_") for c in spec.cap_drop}
    add = {c.upper().removeprefix("CAP_") for c in spec.cap_add}
    for number, cap in enumerate(CAPS):
        if ("ALL" in drop or cap in drop) and cap not in add:
            try:
                _call("prctl", PR_CAPBSET_DROP, number, 0, 0, 0)
            except OSError:
                if number < 38:  # newer capabilities may not exist in this kernel
                    raise
    if spec.no_new_privs:
        _call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.setgroups(sorted(set(spec.groups)))
    os.setresgid(spec.gid, spec.gid, spec.gid)
    os.setresuid(spec.uid, spec.uid, spec.uid)


def launch(spec_path: str, report_fd: int) -> None:
    os.set_inheritable(report_fd, False)  # closed by the exec: EOF tells the caller the process started

    def fail(reason: str, message: str) -> None:
        os.write(report_fd, json.dumps({"reason": reason, "message": message}).encode())
        os._exit(EXIT_START_ERROR)

    try:
        with open(spec_path) as fh:
            spec = Spec.from_json(fh.read())
        if spec.netns:  # the pod's network first: unshare below then copies nothing network-related
            fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _call("setns", fd, CLONE_NEWNET)
            finally:
                os.close(fd)
        _call("unshare", CLONE_NEWNS | CLONE_NEWUTS)
        _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host
        root = _setup_root(spec)
        os.chroot(root)
        os.chdir(spec.cwd or "/")
        if spec.hostname:
            name = spec.hostname.encode()
            _call("sethostname", name, len(name))
        _drop_privileges(spec)
    except OSError as err:
        fail("StartError", f"failed to create containerd task: failed to create shim task: OCI runtime create "
                           f"failed: runc create failed: unable to start container process: {err}: unknown")
    if "HOME" not in spec.env:  # as runc: the user's home from the root's /etc/passwd, else /
        import pwd
        try:
            spec.env["HOME"] = pwd.getpwuid(spec.uid).pw_dir
        except KeyError:
            spec.env["HOME"] = "/"
    if not spec.argv:
        fail("StartError", "failed to create containerd task: OCI runtime create failed: no command specified")
    path = _which(spec.argv[0], spec.env)
    if path is None:
        why = "executable file not found in $PATH" if "/" not in spec.argv[0] else "no such file or directory"
        fail("StartError", "failed to create containerd task: failed to create shim task: OCI runtime create "
                           "failed: runc create failed: unable to start container process: exec: "
                           f"\"{spec.argv[0]}\": {why}: unknown")
    try:
        os.execve(path, spec.argv, spec.env)
    except OSError as err:
        fail("StartError", f"failed to create containerd task: exec: \"{spec.argv[0]}\": {err.strerror}: unknown")


if __name__ == "__main__":
    launch(sys.argv[1], int(sys.argv[2]))
