"""PromQL of the alerts and the dashboard parsed with Prometheus' own grammar (the lezer-promql npm package,
run by node). Skipped, with the reason, where node or the package is missing; install it with
`npm install --prefix .cache/node @prometheus-io/lezer-promql@0.315.0 @lezer/lr@1.4.12 @lezer/highlight`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from . import chart as C
from .helpers import REPO
from .test_chart_static import dashboard_exprs

SCRIPT = Path(__file__).with_name("promql_check.mjs")


def node_modules() -> Path | None:
    cache = Path(os.environ.get("BRANCHMERGE_TEST_CACHE", REPO / ".cache"))
    for base in (cache / "node", REPO / ".cache" / "node"):
        if (base / "node_modules" / "@prometheus-io" / "lezer-promql").is_dir():
            return base / "node_modules"
    return None


pytestmark = pytest.mark.skipif(shutil.which("node") is None or node_modules() is None,
                                reason="PromQL not parsed: node or @prometheus-io/lezer-promql missing "
                                       "(npm install --prefix .cache/node @prometheus-io/lezer-promql@0.315.0 "
                                       "@lezer/lr@1.4.12 @lezer/highlight)")


def parse_failures(exprs: list[str]) -> list[dict]:
    # Node resolves bare imports from the script's folder upwards: run a copy placed next to node_modules.
    runner = node_modules().parent / SCRIPT.name
    shutil.copyfile(SCRIPT, runner)
    proc = subprocess.run(["node", str(runner)], input=json.dumps(exprs), capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(proc.stdout)


def grafana_to_promql(expr: str) -> str:
    """Grafana's interval variables are durations in PromQL; the others sit inside label matchers' strings."""
    return expr.replace("$__rate_interval", "5m").replace("$__range", "1d")


def test_parser_catches_a_syntax_error():
    assert parse_failures(["sum by (kind (rate(x[5m]))"]), "the checker must reject broken PromQL"
    assert parse_failures(["sum by (kind) (rate(x[5m]))"]) == []


def test_dashboard_queries_parse():
    exprs = [grafana_to_promql(e) for e in dashboard_exprs() if not e.startswith("label_values(")]
    assert exprs
    assert parse_failures(exprs) == []


def test_alert_expressions_parse():
    (rule,) = C.by_kind(C.render({"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(exprs) == 5
    assert parse_failures(exprs) == []
