"""Runs INSIDE the sandbox child, before the untrusted program: confine the process, then run the program.

Started as ``python -I -B _sandbox_runner.py CONFIG_JSON`` with an empty environment, cwd = the work dir,
stdin/stdout/stderr already redirected to files by the parent. This file must not import branchmerge (the
child may run another interpreter) and uses only the standard library.

Order matters: read the program, enter a new network namespace, drop root (if root and possible), set
resource limits, install the audit hook, and only then execute the untrusted code.
"""
import ctypes
import ctypes.util
import json
import os
import resource
import signal
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NOBODY = 65534


def _unshare_network(libc):
    """New empty network namespace: no interface but a down loopback, so every connection fails."""
    if libc.unshare(CLONE_NEWNET) == 0:
        return "netns"
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:  # unprivileged user namespaces (non-root pods)
        return "userns+netns"
    return None


def _limit(name, value):
    soft_hard = (value, value)
    try:
        resource.setrlimit(getattr(resource, name), soft_hard)
    except (ValueError, OSError):
        # cannot raise above an existing hard limit: lower only the soft one
        _, hard = resource.getrlimit(getattr(resource, name))
        if hard == resource.RLIM_INFINITY or value <= hard:
            resource.setrlimit(getattr(resource, name), (value, hard))


def _count_user_processes(uid):
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _install_audit_hook(work_dir, result_fd):
    work_dir = os.path.realpath(work_dir)
    own = str(os.getpid())
    blocked_prefixes = ("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                        "os.forkpty", "os.system", "os.kill", "os.killpg", "pty.", "ctypes.", "winreg.",
                        "os.setuid", "os.setgid", "resource.setrlimit", "resource.prlimit")
    blocked_imports = {"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "ssl", "_ssl",
                       "multiprocessing", "_multiprocessing"}
    path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                   "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile",
                   "os.chdir", "os.chroot", "os.mkfifo", "os.mknod", "os.listxattr", "os.setxattr"}

    def inside(path):
        if isinstance(path, int):
            return path != result_fd
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == work_dir or real.startswith(work_dir + os.sep) or real == os.devnull

    def hook(event, args):
        if event == "import":
            root = (args[0] or "").split(".")[0]
            if root in blocked_imports:
                raise PermissionError(f"sandbox: import {root} is not allowed")
            return
        if event.startswith(blocked_prefixes):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            writing = (mode and any(c in str(mode) for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the work dir is not allowed")
            if isinstance(path, (str, bytes)):
                text = os.fsdecode(path)
                if text.startswith("/proc/") and text.split("/")[2] not in ("self", own, "cpuinfo", "meminfo"):
                    raise PermissionError("sandbox: reading other processes is not allowed")
            return
        if event in path_events:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    raise PermissionError(f"sandbox: {event} outside the work dir is not allowed")

    sys.addaudithook(hook)


def main():
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    with open(cfg["program"]) as f:
        source = f.read()
    work_dir = os.getcwd()
    result_fd = cfg.get("result_fd")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    network = _unshare_network(libc) if cfg["isolate_network"] else None
    if cfg["isolate_network"] and cfg.get("require_netns") and network is None:
        sys.stderr.write("sandbox: cannot create a network namespace\n")
        os._exit(125)
    if cfg.get("drop_to_nobody") and os.getuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    mem = cfg["memory_mb"] * 1024 * 1024
    _limit("RLIMIT_AS", mem)
    _limit("RLIMIT_DATA", mem)
    _limit("RLIMIT_CPU", int(cfg["cpu_seconds"]))
    _limit("RLIMIT_FSIZE", cfg["file_size_mb"] * 1024 * 1024)
    _limit("RLIMIT_NOFILE", 64)
    _limit("RLIMIT_CORE", 0)
    if os.getuid() != 0:  # root ignores RLIMIT_NPROC; it counts per user, so leave room for what already runs
        _limit("RLIMIT_NPROC", _count_user_processes(os.getuid()) + cfg["extra_processes"])
    sys.stdout.flush()
    results = os.fdopen(result_fd, "w", closefd=False) if cfg["mode"] == "functional" else None
    if cfg.get("audit_hook", True):
        _install_audit_hook(work_dir, result_fd)
    del libc
    for name in ("ctypes", "ctypes.util", "_ctypes"):
        sys.modules.pop(name, None)
    sys.argv = ["solution.py"]
    sys.path.insert(0, work_dir)
    if cfg["mode"] == "script":
        globs = {"__name__": "__main__", "__file__": os.path.join(work_dir, "solution.py"), "__builtins__": __builtins__}
        exec(compile(source, "solution.py", "exec"), globs)
        return
    _run_functional(source, cfg, results)


def _run_functional(source, cfg, out):
    """Define the program, then call ``fn_name`` on each case; one JSON line per case on ``out``."""
    real_stdout = sys.stdout
    sys.stdout = open(os.devnull, "w")  # the program's prints must not mix with results
    globs = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(source, "solution.py", "exec"), globs)
    except BaseException as err:
        out.write(json.dumps({"error": f"{type(err).__name__}: {err}"[:500]}) + "\n")
        out.flush()
        return
    fn_name = cfg["fn_name"]
    target = globs.get(fn_name)
    if target is None and "Solution" in globs:  # LeetCode style
        target = getattr(globs["Solution"](), fn_name, None)
    if target is None:
        out.write(json.dumps({"error": f"NameError: {fn_name} is not defined"}) + "\n")
        out.flush()
        return

    def on_alarm(signum, frame):
        raise TimeoutError("case timed out")

    signal.signal(signal.SIGALRM, on_alarm)
    for args in cfg["cases"]:
        signal.setitimer(signal.ITIMER_REAL, cfg["case_timeout"])
        try:
            value = target(*args)
            signal.setitimer(signal.ITIMER_REAL, 0)
            line = json.dumps({"ok": True, "value": value}, default=repr)
        except BaseException as err:
            signal.setitimer(signal.ITIMER_REAL, 0)
            line = json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"[:500],
                               "timeout": isinstance(err, TimeoutError)})
        out.write(line + "\n")
        out.flush()
    sys.stdout = real_stdout


if __name__ == "__main__":
    main()
