"""Prometheus metrics of the operator (one registry per operator instance, served on --metrics-port).

Low cardinality: kind/phase/reason labels have a fixed small set of values; per-CR series exist only for
stage results worth graphing (eval scores per benchmark, generation throughput, training loss) and are
removed when the CR is deleted.
"""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..api.common import KINDS, PHASES

DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 604800)


class _PhaseCollector:
    """branchmerge_resources{kind,phase}: computed at scrape time from the operator's store."""

    def __init__(self, crs: Callable[[], Iterable[dict]]):
        self._crs = crs

    def collect(self):
        family = GaugeMetricFamily("branchmerge_resources", "Custom resources by kind and phase",
                                   labels=["kind", "phase"])
        counts = {(k, p): 0 for k in KINDS for p in PHASES}
        for cr in self._crs():
            phase = (cr.get("status") or {}).get("phase") or "Pending"
            if (cr.get("kind"), phase) in counts:
                counts[(cr["kind"], phase)] += 1
        for (kind, phase), n in counts.items():
            family.add_metric([kind, phase], n)
        yield family


class OperatorMetrics:
    def __init__(self, crs: Callable[[], Iterable[dict]]):
        self.registry = CollectorRegistry()
        self.registry.register(_PhaseCollector(crs))
        r = self.registry
        self.stage_duration = Histogram("branchmerge_stage_duration_seconds",
                                        "Wall time of finished runs (start to completion)", ["kind", "result"],
                                        buckets=DURATION_BUCKETS, registry=r)
        self.retries = Counter("branchmerge_retries_total", "Attempts retried after a retryable failure",
                               ["kind", "reason"], registry=r)
        self.reconcile_errors = Counter("branchmerge_reconcile_errors_total", "Reconciles that raised",
                                        ["kind"], registry=r)
        self.reconciles = Counter("branchmerge_reconciles_total", "Reconciles run", ["kind"], registry=r)
        # Cost of finished runs (status.cost, all attempts), counted once when the run ends: rate() over them
        # is the cluster's spend by kind, e.g. GPU-hours a day on training vs merging.
        self.stage_wall_seconds = Counter("branchmerge_stage_wall_seconds",
                                          "Wall time of finished runs, all attempts", ["kind"], registry=r)
        self.stage_cpu_seconds = Counter("branchmerge_stage_cpu_seconds",
                                         "CPU time (user + system) of finished runs, all attempts", ["kind"], registry=r)
        self.stage_gpu_seconds = Counter("branchmerge_stage_gpu_seconds",
                                         "GPU-seconds (GPUs requested x pod run time) of finished runs, all attempts",
                                         ["kind"], registry=r)
        self.eval_score = Gauge("branchmerge_eval_score", "Eval pass@1 (mean over samples) per benchmark",
                                ["namespace", "name", "benchmark"], registry=r)
        self.tokens_per_second = Gauge("branchmerge_teachergen_tokens_per_second",
                                       "TeacherGen generation throughput", ["namespace", "name"], registry=r)
        self.acceptance = Gauge("branchmerge_teachergen_acceptance_ratio",
                                "TeacherGen samples kept / samples judged (verified and filtered)",
                                ["namespace", "name"], registry=r)
        self.sft_loss = Gauge("branchmerge_sft_loss", "BranchSFT training loss", ["namespace", "name"], registry=r)
        self._series: dict[tuple[str, str], list[tuple[Gauge, tuple]]] = {}

    def observe_cr(self, cr: dict) -> None:
        """Refresh the per-CR gauges from its status (stages report progress metrics into it)."""
        meta = cr["metadata"]
        ns, name = meta.get("namespace", ""), meta["name"]
        metrics = (cr.get("status") or {}).get("metrics") or {}
        kind = cr["kind"]
        if kind == "TeacherGen":
            if _number(metrics.get("tokensPerSecond")) is not None:
                self._set(self.tokens_per_second, (ns, name), metrics["tokensPerSecond"], ns, name)
            ratio = acceptance_ratio(metrics)
            if ratio is not None:
                self._set(self.acceptance, (ns, name), ratio, ns, name)
        elif kind == "BranchSFT" and _number(metrics.get("loss")) is not None:
            self._set(self.sft_loss, (ns, name), metrics["loss"], ns, name)
        elif kind == "Eval":
            if _number(metrics.get("score")) is not None:  # mean pass@1 over benchmarks
                self._set(self.eval_score, (ns, name, "all"), metrics["score"], ns, name)
            # a re-grading Eval (spec.regrade) lists no benchmarks: it reports those of the Eval it re-grades
            for bench in (cr.get("spec") or {}).get("benchmarks") or [{"name": n} for n in metric_benchmarks(metrics)]:
                score = benchmark_score(metrics, bench.get("name", ""))
                if score is not None:
                    self._set(self.eval_score, (ns, name, bench["name"]), score, ns, name)

    def observe_cost(self, kind: str, cost: dict | None) -> None:
        """Add a finished run's status.cost to the cost counters (the caller calls it once per run)."""
        cost = cost or {}
        for counter, key in ((self.stage_wall_seconds, "wallSeconds"), (self.stage_cpu_seconds, "cpuSeconds"),
                             (self.stage_gpu_seconds, "gpuSeconds")):
            value = _number(cost.get(key))
            if value is not None and value >= 0:
                counter.labels(kind).inc(value)

    def _set(self, gauge: Gauge, labels: tuple, value, ns: str, name: str) -> None:
        gauge.labels(*labels).set(float(value))
        series = self._series.setdefault((ns, name), [])
        if (gauge, labels) not in series:
            series.append((gauge, labels))

    def forget_cr(self, namespace: str, name: str) -> None:
        for gauge, labels in self._series.pop((namespace, name), []):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def acceptance_ratio(metrics: dict) -> float | None:
    """kept / (kept + rejected); progress events carry rejections by reason (a dict), results their sum."""
    kept, rejected = _number(metrics.get("samplesKept")), metrics.get("samplesRejected")
    if isinstance(rejected, dict):
        rejected = sum(v for v in rejected.values() if _number(v) is not None)
    rejected = _number(rejected)
    if kept is None or rejected is None or kept + rejected <= 0:
        return None
    return kept / (kept + rejected)


def metric_benchmarks(metrics: dict) -> list[str]:
    """Benchmark names an Eval's metrics report (nested, or the termination message's flattened keys)."""
    nested = metrics.get("benchmarks")
    if isinstance(nested, dict) and nested:
        return list(nested)
    return [k[len("benchmarks."):-len(".pass1")] for k in metrics
            if k.startswith("benchmarks.") and k.endswith(".pass1")]


def benchmark_score(metrics: dict, bench: str) -> float | None:
    """pass@1 of one benchmark in whichever shape it reached the status: the Eval stage's nested
    ``benchmarks: {name: {pass1}}``, its progress events' ``pass1/<name>``, or the flattened
    termination message's ``benchmarks.<name>.pass1``."""
    nested = metrics.get("benchmarks")
    if isinstance(nested, dict) and isinstance(nested.get(bench), dict):
        for key in ("pass1", "passAt1", "pass@1", "score"):
            if _number(nested[bench].get(key)) is not None:
                return _number(nested[bench][key])
    for key in (f"benchmarks.{bench}.pass1", f"pass1/{bench}"):
        if _number(metrics.get(key)) is not None:
            return _number(metrics[key])
    return None


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0"):
    """Serve /metrics from a daemon thread; returns the HTTP server (``server_port`` is the bound port)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
