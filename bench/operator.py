"""Operator benchmark: 200 CRs created at once against an API server stand-in.

Measures the time from each CR's creation (its POST returning) to its child Job appearing on a watch
stream, and the operator's resident memory. The operator runs as it does in production, as the
``branchmerge operator`` process of the operator image's environment (built by scripts/install.sh; this
venv otherwise), logging in through a kubeconfig, so its RSS is its own; the server runs in this process.

Baseline, measured in the same run: a client that creates the Job itself right after the CR (no
operator), i.e. the floor the server and the watch impose. Goals: p50 <= 0.5 s, p99 <= 2 s, RSS <= 150 MB.

Two servers, one after the other in the same run (``--server both``, the default): ``testcluster`` (the
faithful stand-in: decoding, pruning, CRD defaulting, schema and CEL validation, Job defaulting, async GC)
and ``emulator`` (the older kmock-based one, operator/emulator.py, which skips all of that).

    .venv/bin/python bench/operator.py [--crs 200] [--workers 8] [--server both|testcluster|emulator] [--smoke]

--smoke: 5 CRs against each server (seconds), so tests/test_bench_smoke.py notices when the bench stops
running; its numbers mean nothing. Exit status 1 when a Job is missing.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import contextlib
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testcluster/ lives at the repo root

from branchmerge.operator.emulator import Api, EmulatorThread  # noqa: E402

NS = "bench"
BASE_NS = "baseline"  # not served by the operator


def merge_cr(name: str) -> dict:
    return {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge", "metadata": {"name": name},
            "spec": {"method": "linear", "models": [{"uri": "pvc://models/a"}, {"uri": "pvc://models/b"}],
                     "output": {"uri": f"pvc://models/{name}"}}}


class JobWatcher(threading.Thread):
    """Records when each Job (by its CR's name label) is first seen on a watch stream."""

    def __init__(self, server: str):
        super().__init__(daemon=True)
        self.url = f"{server}/apis/batch/v1/jobs?watch=true"  # all namespaces
        self.seen: dict[str, float] = {}
        self.started = threading.Event()

    def run(self) -> None:
        with urllib.request.urlopen(self.url, timeout=3600) as stream:
            self.started.set()
            for line in stream:
                if not line.strip():
                    continue
                event = json.loads(line)
                labels = event.get("object", {}).get("metadata", {}).get("labels") or {}
                owner = labels.get("branchmerge.dev/name") or event["object"]["metadata"]["name"]
                self.seen.setdefault(owner, time.time())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def create_all(api: Api, docs: list[dict], then=None, namespace: str = NS) -> dict[str, float]:
    created: dict[str, float] = {}

    def one(doc):
        api.create(doc, namespace)
        created[doc["metadata"]["name"]] = time.time()
        if then:
            then(doc)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(one, docs))
    return created


def wait_all(watcher: JobWatcher, names: list[str], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not all(n in watcher.seen for n in names):
        time.sleep(0.05)


def latencies(created: dict[str, float], seen: dict[str, float]) -> list[float]:
    return [seen[n] - t for n, t in created.items() if n in seen]


def operator_python() -> str:
    """The operator image's interpreter (what the operator pod runs) when scripts/install.sh built it."""
    from testcluster import images

    python = images.venv_dir("operator") / "bin" / "python"
    if python.exists():
        images.refresh("operator")
        return str(python)
    print("note: the operator image env is not built; the operator runs from this venv")
    return sys.executable


@contextlib.contextmanager
def serve(which: str):
    """The URL of a fresh API server of the given kind, with the namespaces the benchmark uses."""
    if which == "emulator":
        with EmulatorThread() as emu:
            yield emu.url
        return
    from testcluster.apiserver import ApiServer

    with ApiServer() as server:
        api = Api(server.url)
        for ns in (NS, BASE_NS):
            api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        yield server.url


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--server", choices=("both", "testcluster", "emulator"), default="both")
    ap.add_argument("--profile", metavar="FILE", help="run the operator under cProfile, write stats here")
    ap.add_argument("--smoke", action="store_true", help="5 CRs per server: does the bench still run")
    args = ap.parse_args()
    if args.smoke:
        args.crs = 5
    servers = ("testcluster", "emulator") if args.server == "both" else (args.server,)
    failed = 0
    for which in servers:
        print(f"== against {which}")
        failed += measure(which, args)
    return 1 if failed else 0


def measure(which: str, args) -> int:
    with serve(which) as url, tempfile.TemporaryDirectory() as tmp:
        emu_url = url
        api = Api(url)
        watcher = JobWatcher(emu_url)
        watcher.start()
        watcher.started.wait(10)

        # Baseline: the client creates each Job itself right after its CR.
        def direct_job(doc):
            name = doc["metadata"]["name"]
            api.create({"apiVersion": "batch/v1", "kind": "Job",
                        "metadata": {"name": f"{name}-job", "labels": {"branchmerge.dev/name": name}},
                        "spec": {"suspend": True, "template": {"spec": {
                            "restartPolicy": "Never",
                            "containers": [{"name": "c", "image": "ghcr.io/branchmerge/trainer-cpu:0.1.0"}]}}}},
                       BASE_NS)

        base_docs = [merge_cr(f"base-{i}") for i in range(args.crs)]
        base_created = create_all(api, base_docs, then=direct_job, namespace=BASE_NS)
        wait_all(watcher, list(base_created), 60)
        base = latencies(base_created, watcher.seen)

        kubeconfig = os.path.join(tmp, "kubeconfig")
        with open(kubeconfig, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "emu",
                       "clusters": [{"name": "emu", "cluster": {"server": emu_url}}],
                       "users": [{"name": "u", "user": {"token": "bench"}}],
                       "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u", "namespace": NS}}]}, f)
        operator = subprocess.Popen(
            [operator_python(), "-P"] + (["-m", "cProfile", "-o", args.profile] if args.profile else []) +
            ["-m", "branchmerge.cli", "operator", "-n", NS, "--kubeconfig", kubeconfig,
             "--metrics-port", "0", "--liveness", "", "--workers", str(args.workers)],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "operator.log"), "w"))
        proc = psutil.Process(operator.pid)
        peak = [0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.05)

        threading.Thread(target=sample, daemon=True).start()
        try:
            # Wait until a warm-up CR gets its Job: the measurement starts with an operator at rest.
            warm = merge_cr("warmup")
            create_all(api, [warm])
            wait_all(watcher, ["warmup"], 120)
            if "warmup" not in watcher.seen:
                print(open(os.path.join(tmp, "operator.log")).read()[-3000:])
                raise SystemExit("the operator did not start")
            time.sleep(2.0)
            rss_idle = proc.memory_info().rss
            docs = [merge_cr(f"cr-{i}") for i in range(args.crs)]
            cpu0, here0 = proc.cpu_times(), psutil.Process().cpu_times()
            t0 = time.time()
            created = create_all(api, docs)
            wait_all(watcher, list(created), 300)
            span = time.time() - t0
            cpu1, here1 = proc.cpu_times(), psutil.Process().cpu_times()
            op_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            emu_cpu = (here1.user + here1.system) - (here0.user + here0.system)
            time.sleep(1.0)
            lat = latencies(created, watcher.seen)
        finally:
            stop.set()
            operator.send_signal(2)  # SIGINT: a clean exit (cProfile writes its stats)
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                operator.kill()

    missing = args.crs - len(lat)
    p50, p99 = statistics.median(lat), percentile(lat, 0.99)
    b50, b99 = statistics.median(base), percentile(base, 0.99)
    rss = peak[0] / 2**20
    print(f"{args.crs} CRs created at once ({span:.1f} s until the last Job); missing Jobs: {missing}")
    print(f"  CR -> Job latency  p50 {p50:.3f} s  p99 {p99:.3f} s   (goal p50 <= 0.5 s, p99 <= 2 s)")
    print(f"  baseline (client creates the Job itself)  p50 {b50:.3f} s  p99 {b99:.3f} s")
    print(f"  ratio operator/baseline  p50 x{p50 / max(b50, 1e-6):.1f}  p99 x{p99 / max(b99, 1e-6):.1f}")
    print(f"  ratio to goal  p50 {p50 / 0.5:.2f}  p99 {p99 / 2.0:.2f}  RSS {rss / 150:.2f}")
    print(f"  CPU during the burst: operator {op_cpu:.1f} s ({1000 * op_cpu / args.crs:.1f} ms per CR), "
          f"server + client {emu_cpu:.1f} s; machine load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"  operator RSS  peak {rss:.0f} MB, idle before the burst {rss_idle / 2**20:.0f} MB   (goal <= 150 MB)")
    return 0 if missing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
