"""Checks of the chart that need no Helm: values against the schema, values used by the templates,
CRD copies in sync with crds/, and the monitoring assets against the operator's real metrics."""
from __future__ import annotations

import importlib.util
import json
import re

import jsonschema
import pytest
import yaml

from branchmerge.api.resources import KIND_INFO

from .helpers import CHART, REPO

VALUES_REF = re.compile(r"\$?\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
VAR_ASSIGN = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)\s*:=\s*\$?\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
VAR_REF = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)
METRIC = re.compile(r"\b(branchmerge_[a-z0-9_]+)")


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))


def template_texts() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((CHART / "templates").glob("*"))
            if p.suffix in (".yaml", ".tpl", ".txt")}


def referenced_paths() -> set[tuple[str, ...]]:
    paths: set[tuple[str, ...]] = set()
    for text in template_texts().values():
        variables = {name: tuple(path.strip(".").split(".")) for name, path in VAR_ASSIGN.findall(text)}
        # `$rule := .Values.metrics.prometheusRule` uses nothing by itself: its `$rule.x` references do
        paths |= {tuple(m.strip(".").split(".")) for m in VALUES_REF.findall(VAR_ASSIGN.sub("", text))}
        for name, rest in VAR_REF.findall(text):
            if name in variables:
                paths.add(variables[name] + tuple(rest.strip(".").split(".")))
    return paths


def leaves(node, prefix=()) -> set[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        out = set()
        for key, value in node.items():
            out |= leaves(value, prefix + (key,))
        return out
    return {prefix}


def test_schema_is_valid_and_values_validate():
    jsonschema.Draft7Validator.check_schema(schema())
    jsonschema.Draft7Validator(schema()).validate(values())


@pytest.mark.parametrize(("override", "path"), [
    ({"replicaCount": 0}, "replicaCount"),
    ({"watch": {"allNamespaces": False, "namespaces": ["Team_A"]}}, "watch.namespaces.0"),
    ({"metrics": {"prometheusRule": {"stuckAfter": "an hour"}}}, "metrics.prometheusRule.stuckAfter"),
    ({"trainer": {"defaultOutputRoot": "s3://bucket/x"}}, "trainer.defaultOutputRoot"),
    ({"trainer": {"image": {"repository": "x", "digest": "latest"}}}, "trainer.image.digest"),
    ({"operater": {}}, ""),  # a typo at the top level
    ({"metrics": {"serviceMonitor": {"enable": True}}}, "metrics.serviceMonitor"),
])
def test_schema_rejects_bad_values(override, path):
    merged = _merge(values(), override)
    errors = list(jsonschema.Draft7Validator(schema()).iter_errors(merged))
    assert errors, f"{override} should be rejected"
    assert any(".".join(str(p) for p in e.absolute_path) == path for e in errors)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def test_every_value_used_by_a_template_exists():
    vals = values()
    missing = []
    for path in sorted(referenced_paths()):
        node = vals
        for key in path:
            if not isinstance(node, dict) or key not in node:
                missing.append(".".join(path))
                break
            node = node[key]
    assert not missing, f"templates read values that values.yaml does not define: {missing}"


def test_every_value_is_used_by_a_template():
    used = referenced_paths()
    dead = [".".join(leaf) for leaf in sorted(leaves(values()))
            if not any(leaf[:len(u)] == u for u in used)]
    assert not dead, f"values.yaml keys no template reads: {dead}"


def test_schema_describes_exactly_the_values():
    def schema_leaves(node, prefix=()):
        props = node.get("properties")
        if node.get("type") == "object" and props:
            out = set()
            for key, sub in props.items():
                out |= schema_leaves(sub, prefix + (key,))
            return out
        return {prefix}
    in_schema = {leaf for leaf in schema_leaves(schema()) if leaf != ("global",)}
    in_values = {leaf for leaf in leaves(values())}
    # a values leaf may be an empty map/list the schema types as a whole (podAnnotations: {})
    phantom = [".".join(s) for s in in_schema if not any(v[:len(s)] == s or s[:len(v)] == v for v in in_values)]
    assert not phantom, f"schema properties missing from values.yaml: {phantom}"


def test_template_blocks_are_balanced():
    openers = ("if ", "range ", "with ", "define ", "block ")
    for name, text in template_texts().items():
        depth = 0
        for action in ACTION.findall(text):
            if action.startswith("/*"):
                continue
            if action.startswith(openers):
                depth += 1
            elif action == "end":
                depth -= 1
                assert depth >= 0, f"{name}: unexpected end"
        assert depth == 0, f"{name}: {depth} block(s) not closed"


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_crds", CHART / "scripts" / "sync_crds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chart_crds_match_the_generated_crds():
    sync = _sync_module()
    plan = sync.planned()
    assert sync.stale(plan) == [], "run: python charts/branchmerge/scripts/sync_crds.py"
    own = [p for p in plan if p.parent.name == "crds" and p.parent.parent.name == "files"]
    assert len(own) == len(KIND_INFO), "every branchmerge.dev CRD is rendered as a template"
    # the peering objects the chart creates need their CRDs in the chart's crds/ (installed before templates)
    installed_first = {yaml.safe_load(p.read_text(encoding="utf-8"))["spec"]["names"]["kind"]
                       for p in (CHART / "crds").glob("*.yaml")}
    used = set(re.findall(r"^kind: (\w+)", (CHART / "templates" / "peering.yaml").read_text(encoding="utf-8"), re.M))
    assert used == {"ClusterKopfPeering", "KopfPeering"} and used <= installed_first


def operator_metric_names() -> set[str]:
    """Names the operator really exports: its registry, collected (histograms expand to _bucket/_count/_sum)."""
    from branchmerge.operator.metrics import OperatorMetrics

    registry = OperatorMetrics(lambda: []).registry
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names |= {sample.name for sample in family.samples}
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def dashboard() -> dict:
    return json.loads((CHART / "dashboards" / "branchmerge.json").read_text(encoding="utf-8"))


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        if isinstance(var.get("query"), dict):
            exprs.append(var["query"]["query"])
    return exprs


def test_dashboard_and_alerts_use_metrics_the_operator_exports():
    exported = operator_metric_names()
    rules = (CHART / "templates" / "prometheusrule.yaml").read_text(encoding="utf-8")
    used = set(METRIC.findall(rules)) | {m for e in dashboard_exprs() for m in METRIC.findall(e)}
    # label_values({__name__=~"branchmerge_(a|b)"}) names metrics by regex
    for expr in dashboard_exprs():
        for group in re.findall(r'__name__=~"branchmerge_\(([a-z_|]+)\)"', expr):
            used |= {f"branchmerge_{name}" for name in group.split("|")}
    used.discard("branchmerge_")
    assert used - exported == set(), f"not exported by branchmerge.operator.metrics: {sorted(used - exported)}"


def test_dashboard_structure():
    dash = dashboard()
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("by phase", "duration", "tokens/s", "acceptance", "loss", "eval scores"):
        assert topic in titles, f"dashboard has no panel about {topic}"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert p["targets"]
    names = {v["name"] for v in dash["templating"]["list"]}
    referenced = {m for e in dashboard_exprs() for m in re.findall(r"\$(\w+)", e)} - {"__range", "__rate_interval"}
    assert referenced <= names, f"undefined dashboard variables: {referenced - names}"


def test_promql_brackets_balance():
    rules = (CHART / "templates" / "prometheusrule.yaml").read_text(encoding="utf-8")
    exprs = dashboard_exprs() + re.findall(r"expr: >-\n((?:\s{12}.*\n)+)|expr: (.*)\n", rules)
    for expr in exprs:
        text = "".join(expr) if isinstance(expr, tuple) else expr
        text = re.sub(r'"[^"]*"', '""', text)
        for open_, close in ("()", "[]", "{}"):
            assert text.count(open_) == text.count(close), f"unbalanced {open_}{close} in {text!r}"


def test_versions_and_uids_agree_across_chart_images_and_operator():
    import tomllib

    from branchmerge.operator.options import OperatorOptions

    from testcluster import dockerfiles as D
    from .helpers import IMAGES

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    with open(REPO / "pyproject.toml", "rb") as fh:
        version = tomllib.load(fh)["project"]["version"]
    assert chart["appVersion"] == version
    vals = values()
    # the operator's own default trainer image is the chart's default
    assert f"{vals['trainer']['image']['repository']}:{chart['appVersion']}" == OperatorOptions().image

    def image_uid(name: str) -> int:
        final = D.stages((IMAGES / name / "Dockerfile").read_text(encoding="utf-8"))[-1]
        return int(final.all("USER")[-1].value.split(":")[0])

    assert vals["podSecurityContext"]["runAsUser"] == image_uid("operator")
    # stage pods run as the operator's run_as_user: the trainer images' own user, so files they create in
    # the image's HOME-less layout and on PVCs (fsGroup) belong to the same uid
    assert OperatorOptions().run_as_user == image_uid("trainer") == image_uid("trainer-cpu")
