"""The local scheduler: run a set of CRs as a DAG of ``branchmerge stage`` subprocesses on this machine.

One loop, no threads: every tick it (1) starts the stages whose upstreams succeeded (or marks them cached,
or failed with UpstreamFailed), up to ``jobs`` at a time, (2) tails the running stages' progress files into
their status, (3) collects finished processes (result file -> Succeeded/Failed, retries with backoff for
retryable failures as on Kubernetes). SIGINT/SIGTERM stop the children by process group and leave every
status consistent: running -> Failed/Interrupted, not started -> unchanged phase, reason Interrupted.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

import yaml

from ...api.cost import add_costs, clean_cost
from ...api.manifests import ManifestSet
from ...api.outputs import attempt_succeeded
from ...api.resources import CustomResource
from ...api.progress import read_events
from ...api.timefmt import format_time
from ...api import conditions as cond
from ..policy import after_failure, effective_phase, exit_failure, waiting
from ..resolve import blockers, resolve, spec_hash
from . import cache
from .launch import EnvError, local_ranks, stage_command, stage_env
from .searches import LocalSearches
from .status_files import CACHE_KEY, LOG, RANKS, SPEC_HASH, StatusFiles, annotations
from .summary import print_summary
from .workdir import Workdir

TICK = 0.2


class SelectionError(ValueError):
    """--only / --from name stages that cannot run as asked."""


@dataclass
class RunOptions:
    jobs: int = 1
    only: list[str] = field(default_factory=list)
    from_: str | None = None
    no_cache: bool = False
    grace_seconds: float = 20.0
    threads: int | None = None  # OMP threads per stage; default cores // jobs


@dataclass
class Attempt:
    """A running stage process."""

    proc: subprocess.Popen
    log: IO
    started: float
    ranks: int
    progress_offset: int = 0
    last_save: float = 0.0
    deadline: float | None = None
    stop_reason: str | None = None  # set when the runner itself stops it (Interrupted, DeadlineExceeded)
    cores: list[int] = field(default_factory=list)
    rusage: object = None  # resource usage of the whole process tree, from wait4 when it is reaped


def _match(dag_keys: list[str], name: str) -> str:
    """A selection name: Kind/name or a bare name (must be unambiguous)."""
    if name in dag_keys:
        return name
    hits = [k for k in dag_keys if k.split("/", 1)[1] == name]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise SelectionError(f"{name}: no such stage among the manifests")
    raise SelectionError(f"{name} is ambiguous ({', '.join(hits)}): write Kind/name")


def last_line(path: Path, limit: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 16384))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:limit] if lines else ""


class Runner:
    def __init__(self, manifests: ManifestSet, workdir: Workdir, options: RunOptions | None = None,
                 display=None):
        self.manifests = manifests
        self.workdir = workdir
        self.options = options or RunOptions()
        self.status_files = StatusFiles(workdir)
        self.dag = manifests.dag()
        self.order = self.dag.order()
        self.resources: dict[str, CustomResource] = {r.key: r for r in manifests.resources}
        self.display = display
        self.records: dict[str, dict] = {}
        self.running: dict[str, Attempt] = {}
        self.retry_at: dict[str, float] = {}
        self.finished: set[str] = set()
        self.tries: dict[str, int] = {}  # attempts made by this invocation (retry accounting)
        self.cache_checked: set[str] = set()
        self.outside: dict[str, dict | None] = {}
        self.selected: list[str] = []
        self.forced: set[str] = set()
        self.interrupted = False
        self._signals: dict[int, Callable] = {}
        self.searches = LocalSearches(self)  # MergeSearch: adds its trials' stages as it goes

    # ---- selection ----------------------------------------------------------------------------------
    def select(self) -> None:
        opts = self.options
        if opts.only:
            chosen = {_match(self.order, n) for n in opts.only}
            self.forced = set(chosen)
        elif opts.from_:
            start = _match(self.order, opts.from_)
            chosen = {start} | self.dag.descendants(start)
            self.forced = {start}
        else:
            chosen = set(self.order)
        if opts.no_cache:
            self.forced = set(chosen)
        self.selected = [k for k in self.order if k in chosen]
        for key in self.selected:  # upstreams left out of the selection must already be done
            for up in self.dag.upstreams[key]:
                if up in chosen:
                    continue
                record = self.status_files.load(up)
                if not record or record.get("status", {}).get("phase") != "Succeeded":
                    raise SelectionError(f"{key} needs {up}, which has not succeeded in {self.workdir.root}; "
                                         f"run it first or include it in the selection")

    # ---- status helpers -----------------------------------------------------------------------------
    def record(self, key: str) -> dict | None:
        """A selected stage's live record, or the stored one of a stage outside the selection (read once:
        nothing else writes it while this runner holds the workdir)."""
        if key in self.records:
            return self.records[key]
        if key not in self.outside:
            self.outside[key] = self.status_files.load(key)
        return self.outside[key]

    def phase(self, key: str) -> str | None:
        rec = self.record(key)
        return (rec or {}).get("status", {}).get("phase") if rec else None

    def save(self, key: str) -> None:
        self.status_files.save(self.records[key])
        if self.display:
            self.display.update(key, self.records[key])

    def set_phase(self, key: str, phase: str, reason: str, message: str = "", stalled: bool = False) -> None:
        status = self.records[key]["status"]
        changed = self.current(key) != (phase, reason)
        cond.set_phase(status, phase, reason, message, stalled=stalled)
        self.save(key)
        if changed and self.display:
            self.display.transition(key, phase, reason, message)

    def current(self, key: str) -> tuple[str | None, str | None]:
        status = self.records[key]["status"]
        return status.get("phase"), (cond.get_condition(status, "Ready") or {}).get("reason")

    def _upstream_outputs(self) -> tuple[dict[str, str], dict[str, str]]:
        outputs, digests = {}, {}
        for key in self.order:
            rec = self.record(key)
            out = (rec or {}).get("status", {}).get("output") or {}
            if rec and rec["status"].get("phase") == "Succeeded" and out.get("uri"):
                outputs[key] = out["uri"]
                if out.get("digest"):
                    digests[out["uri"]] = out["digest"]
        return outputs, digests

    # ---- the loop -----------------------------------------------------------------------------------
    def _lock(self):
        """One runner per workdir: a second one would launch the same stages into the same outputs."""
        import fcntl

        self.workdir.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.workdir.root / ".lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SelectionError(f"another `branchmerge run` is using {self.workdir.root}") from None
        return handle

    def run(self) -> int:
        self.select()
        lock = self._lock()
        try:
            return self._run()
        finally:
            lock.close()

    def _run(self) -> int:
        for key in self.selected:
            self.records[key] = self.status_files.sync(self.resources[key], self.manifests.sources.get(key))
        if self.display:
            self.display.start(self)
        self._install_signals()
        try:
            while not self.interrupted:
                self._schedule()
                self._poll()
                if not self.running and self._settled():
                    break
                time.sleep(TICK)
            if self.interrupted:
                self._stop_all("Interrupted")
        finally:
            self._restore_signals()
            if self.display:
                self.display.stop()
        return self.exit_code()

    def _settled(self) -> bool:
        """Nothing can change any more: every selected stage is finished or blocked for good."""
        for key in self.selected:
            if key in self.finished:
                continue
            if key in self.retry_at:
                return False
            if self._suspended(key):
                continue
            bl = blockers(self.resources[key], {k: self.phase(k) for k in self.order})
            if not bl or bl[0].reason == "UpstreamFailed" or any(self._can_progress(b.ref.key) for b in bl):
                return False
        return True

    def _can_progress(self, key: str) -> bool:
        return key in self.selected and key not in self.finished and not self._suspended(key)

    def _suspended(self, key: str) -> bool:
        resources = getattr(self.resources[key].spec, "resources", None)  # MergeSearch has none of its own
        return bool(resources is not None and resources.suspend)

    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        # a search's failed trial is recorded in the search, not a failure of the run
        phases = [self.records[k]["status"].get("phase") for k in self.selected if not self.searches.is_child(k)]
        return 0 if all(p == "Succeeded" for p in phases) else 1

    def failures(self) -> list[tuple[str, str, str]]:
        """(key, one-line error, log path) of the stages that failed on their own (not UpstreamFailed)."""
        out = []
        for key in self.selected:
            if self.searches.is_child(key):
                continue
            status = self.records[key]["status"]
            ready = cond.get_condition(status, "Ready") or {}
            if status.get("phase") == "Failed" and ready.get("reason") not in (cond.UPSTREAM_FAILED, cond.INTERRUPTED):
                out.append((key, ready.get("message", ""), annotations(self.records[key]).get(LOG, "")))
        return out

    def _schedule(self) -> None:
        # as downstreams see them: a stage stalled by a failed upstream counts as failed (policy.effective_phase)
        phases = {k: effective_phase((self.record(k) or {}).get("status")) if self.record(k) else None
                  for k in self.order}
        for key in list(self.selected):  # a search's tick adds stages: they are looked at next tick
            if key in self.finished or key in self.running:
                continue
            resource = self.resources[key]
            if self._suspended(key):
                if phases[key] != "Suspended":
                    self.set_phase(key, "Suspended", cond.SUSPENDED, "spec.resources.suspend is true")
                    phases[key] = "Suspended"
                continue
            bl = blockers(resource, phases)
            if bl:
                phase, reason, message, stalled = waiting(bl)
                if stalled:  # nothing more happens to it in this run; a later run starts it once fixed
                    self.set_phase(key, phase, reason, message, stalled=True)
                    self.finished.add(key)
                    phases[key] = "Failed"
                elif self.current(key) != (phase, reason):
                    self.set_phase(key, phase, reason, message)
                    phases[key] = phase
                continue
            if resource.kind == "MergeSearch":  # type: ignore[attr-defined]
                self.searches.tick(key)
                phases[key] = self.phase(key)
                continue
            if key in self.retry_at:
                if time.time() < self.retry_at[key]:
                    continue
                del self.retry_at[key]
            if self._try_cache(key):
                phases[key] = "Succeeded"
                continue
            if len(self.running) >= max(1, self.options.jobs):
                if self.current(key) != ("Pending", cond.CREATED):
                    self.set_phase(key, "Pending", cond.CREATED, f"queued: {len(self.running)} stage(s) running "
                                                                 f"(--jobs {self.options.jobs})")
                    phases[key] = "Pending"
                continue
            self._launch(key)
            phases[key] = self.phase(key)

    def _resolved(self, key: str) -> tuple[dict, str]:
        outputs, digests = self._upstream_outputs()
        resolved = resolve(self.resources[key], outputs, self.workdir.default_output(key))
        ckey = cache.cache_key(resolved, cache.input_digests(resolved, digests))
        return resolved, ckey

    def _try_cache(self, key: str) -> bool:
        # decided once per stage: its upstreams are final by now, and hashing inputs every tick is costly
        if key in self.forced or key in self.cache_checked:
            return False
        self.cache_checked.add(key)
        _, ckey = self._resolved(key)
        stored = self.status_files.load(key)
        if not cache.is_cached(stored, ckey):
            return False
        rec = self.records[key]
        rec["status"] = stored["status"]
        annotations(rec).update({k: v for k, v in annotations(stored).items() if k in (CACHE_KEY, LOG, SPEC_HASH)})
        self.set_phase(key, "Succeeded", cond.CACHED,
                       "skipped: succeeded before with the same resolved spec and input digests")
        self.finished.add(key)
        return True

    def _claim_cores(self) -> list[int]:
        """This machine's cores split into ``jobs`` slots; a stage gets a slot no running stage holds, so
        engines that pin threads (vLLM-CPU binds to cores) do not pile onto the same core."""
        total = os.cpu_count() or 1
        jobs = max(1, min(self.options.jobs, total))
        per = self.options.threads or max(1, total // jobs)
        busy = {c for a in self.running.values() for c in a.cores}
        for slot in range(jobs):
            cores = [(slot * per + i) % total for i in range(per)]
            if not busy.intersection(cores):
                return cores
        return list(range(per))

    def _launch(self, key: str) -> None:
        resource = self.resources[key]
        rec = self.records[key]
        status = rec["status"]
        resolved, ckey = self._resolved(key)
        run_dir = self.workdir.run_dir(key)
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_file, result_file = self.workdir.spec_file(key), self.workdir.result_file(key)
        progress_file, log_file = self.workdir.progress_file(key), self.workdir.log_file(key)
        spec_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
        for stale in (result_file, progress_file):
            stale.unlink(missing_ok=True)
        annotations(rec).update({SPEC_HASH: spec_hash(resolved), CACHE_KEY: ckey, LOG: str(log_file)})
        annotations(rec).pop(RANKS, None)
        status["output"] = {"uri": resolved["spec"]["output"]["uri"]}
        status["metrics"] = {}
        status["progress"] = {"fraction": 0.0, "message": "starting"}
        status["attempts"] = int(status.get("attempts") or 0) + 1
        self.tries[key] = self.tries.get(key, 0) + 1
        if self.tries[key] == 1:  # status.cost: the attempts of this invocation (retries included)
            status.pop("cost", None)
        status["startTime"] = format_time()
        status.pop("completionTime", None)
        cores = self._claim_cores()
        ranks = local_ranks(resource)
        argv, ranks = stage_command(resource, spec_file, result_file, ranks)
        try:
            env = stage_env(resource, progress_file, max(1, len(cores) // ranks), cores)
        except EnvError as err:
            self.set_phase(key, "Failed", cond.INVALID_SPEC, str(err))
            self.finished.add(key)
            return
        if ranks > 1:
            annotations(rec)[RANKS] = str(ranks)
        log = open(log_file, "ab")
        log.write(f"# attempt {status['attempts']}: {' '.join(argv)}\n".encode())
        log.flush()
        # own process group: Ctrl-C in the terminal reaches the runner only, which stops children in order
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        deadline = resource.spec.run_policy.active_deadline_seconds  # type: ignore[attr-defined]
        self.running[key] = Attempt(proc, log, time.time(), ranks, cores=cores,
                                    deadline=time.time() + deadline if deadline else None)
        message = f"attempt {status['attempts']}" + (f", {ranks} ranks" if ranks > 1 else "")
        self.set_phase(key, "Running", cond.STARTED, message)

    def _poll(self) -> None:
        for key in list(self.running):
            attempt = self.running[key]
            self._read_progress(key, attempt)
            if attempt.deadline and time.time() > attempt.deadline and attempt.stop_reason is None:
                attempt.stop_reason = cond.DEADLINE_EXCEEDED
                self._signal(attempt, signal.SIGTERM)
            code = self._reap(attempt)
            if code is not None:
                self._finish(key, attempt, code)

    @staticmethod
    def _reap(attempt: Attempt, block: bool = False) -> int | None:
        """The exit code once the attempt's process ended (None while it runs). Reaped with wait4, not
        Popen.poll, for its rusage: the process plus every descendant it waited for, so the CPU time of all
        ranks under a torchrun launcher (siblings of rank 0, whose own getrusage misses them) counts."""
        proc = attempt.proc
        if proc.returncode is not None:
            return proc.returncode
        try:
            pid, wstatus, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: no rusage, the stage's own report stands
            return proc.wait() if block else proc.poll()
        if pid == 0:
            return None
        attempt.rusage = usage
        proc.returncode = os.waitstatus_to_exitcode(wstatus)  # as Popen reports it: -N for signal N
        return proc.returncode

    def _attempt_cost(self, attempt: Attempt, result: dict, duration: float) -> dict:
        """One attempt's cost: the stage's report (its GPUs) with the runner's own measurements of the whole
        process tree (wall from launch to exit, CPU and peak memory from wait4)."""
        cost = clean_cost(result.get("cost")) or {}
        usage = attempt.rusage
        if usage is not None:
            cpu = usage.ru_utime + usage.ru_stime  # type: ignore[attr-defined]
            peak = usage.ru_maxrss * 1024  # type: ignore[attr-defined]  # KiB on Linux
            cost["cpuSeconds"] = round(max(cost.get("cpuSeconds", 0.0), cpu), 3)
            cost["peakMemoryBytes"] = int(max(cost.get("peakMemoryBytes", 0), peak))
        gpus = int(cost.get("gpus", 0))
        cost.update(wallSeconds=round(duration, 3), gpus=gpus, gpuSeconds=round(gpus * duration, 3), attempts=1)
        return cost

    def _read_progress(self, key: str, attempt: Attempt, force: bool = False) -> None:
        events, attempt.progress_offset = read_events(self.workdir.progress_file(key), attempt.progress_offset)
        if not events:
            return
        status = self.records[key]["status"]
        last = events[-1]
        progress = status.setdefault("progress", {"fraction": 0.0, "message": ""})
        if "fraction" in last:
            progress["fraction"] = round(float(last["fraction"]), 4)
        if last.get("message"):
            progress["message"] = str(last["message"])[:200]
        status["metrics"] = {k: v for k, v in (last.get("metrics") or {}).items()
                             if isinstance(v, (int, float, str, bool))}
        if self.display:
            self.display.progress(key, self.records[key], attempt.started)
        if force or time.time() - attempt.last_save > 1.0:
            attempt.last_save = time.time()
            self.status_files.save(self.records[key])

    def _finish(self, key: str, attempt: Attempt, code: int) -> None:
        del self.running[key]
        attempt.log.close()
        self._read_progress(key, attempt, force=True)
        rec = self.records[key]
        status = rec["status"]
        result = self._result(key)
        duration = time.time() - attempt.started
        status["cost"] = add_costs(status.get("cost"), self._attempt_cost(attempt, result, duration))
        if attempt_succeeded(code, result):
            # a non-zero exit after a complete, digested output (e.g. a rank aborting at exit) still counts
            status["output"] = {"uri": result.get("outputUri") or status.get("output", {}).get("uri"),
                                "digest": result.get("digest")}
            status["metrics"] = result.get("metrics") or {}
            status["progress"] = {"fraction": 1.0, "message": "done"}
            note = "" if code == 0 else f" (process exited {code} after publishing)"
            self.set_phase(key, "Succeeded", cond.SUCCEEDED, f"finished in {duration:.1f}s{note}")
            self.finished.add(key)
            return
        error = result.get("error") or last_line(self.workdir.log_file(key)) or f"exited with code {code}"
        if attempt.stop_reason == cond.INTERRUPTED:
            self.set_phase(key, "Failed", cond.INTERRUPTED, "interrupted (SIGINT/SIGTERM) while running")
            self.finished.add(key)
            return
        if attempt.stop_reason == cond.DEADLINE_EXCEEDED:
            self.set_phase(key, "Failed", cond.DEADLINE_EXCEEDED,
                           f"ran longer than runPolicy.activeDeadlineSeconds; {error}")
            self.finished.add(key)
            return
        run_policy = self.resources[key].spec.run_policy  # type: ignore[attr-defined]
        # attempts made by this invocation: a rerun gets runPolicy's retries again
        then = after_failure(exit_failure(code, result, error), self.tries.get(key, 1), run_policy.backoff_limit,
                             run_policy.backoff_seconds, time.time(), time.time())
        if then.retry_at is not None:
            self.retry_at[key] = then.retry_at
        self.set_phase(key, then.phase, then.reason, then.message)
        if then.final:
            self.finished.add(key)

    def _result(self, key: str) -> dict:
        try:
            return json.loads(self.workdir.result_file(key).read_text())
        except (OSError, ValueError):
            return {}

    # ---- stopping -----------------------------------------------------------------------------------
    @staticmethod
    def _signal(attempt: Attempt, sig: int) -> None:
        try:
            os.killpg(attempt.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _stop_all(self, reason: str) -> None:
        """Stop every child: SIGINT to its process group, SIGTERM after the grace period, SIGKILL last."""
        for attempt in self.running.values():
            attempt.stop_reason = reason
            self._signal(attempt, signal.SIGINT)
        for sig, wait in ((signal.SIGTERM, self.options.grace_seconds), (signal.SIGKILL, 5.0)):
            end = time.time() + wait
            while time.time() < end and any(self._reap(a) is None for a in self.running.values()):
                time.sleep(0.1)
            for attempt in self.running.values():
                if self._reap(attempt) is None:
                    self._signal(attempt, sig)
        for key, attempt in list(self.running.items()):
            self._finish(key, attempt, self._reap(attempt, block=True))
        for key in self.selected:  # never started: keep the phase, say why nothing happened
            if key not in self.finished:
                status = self.records[key]["status"]
                self.retry_at.pop(key, None)
                message = "the run was interrupted before this stage ran"
                cond.set_phase(status, status.get("phase") or "Pending", cond.INTERRUPTED, message)
                cond.set_condition(status, "Reconciling", False, cond.INTERRUPTED, message)
                self.save(key)

    def _on_signal(self, signum, frame) -> None:
        self.interrupted = True

    def _install_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._signals[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: the caller handles interrupts
                pass

    def _restore_signals(self) -> None:
        for sig, handler in self._signals.items():
            signal.signal(sig, handler)
        self._signals.clear()


def run_and_summarise(manifests, workdir, options, display) -> int:
    """Run a loaded manifest set with the local Runner and print the closing summary: the one entry both
    `branchmerge run` and `branchmerge quickstart` use. Bad manifests or a bad selection exit 2."""
    for problem in manifests.problems:
        print(f"error: {problem}", file=sys.stderr)
    if not manifests.ok:
        return 2
    runner = Runner(manifests, workdir, options, display)
    try:
        code = runner.run()
    except SelectionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(runner)
    return code
