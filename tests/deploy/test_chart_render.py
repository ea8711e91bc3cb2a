"""The chart rendered by real Helm (the binary or helm-python-sdk; skipped, with the reason, when neither
exists) with default, namespaced and all-features values; every object validated against the Kubernetes
OpenAPI schemas."""
from __future__ import annotations

import argparse
import importlib
import json

import kubernetes_validate
import pytest
import yaml

from . import chart as C
from .helpers import CHART, DEPLOY

pytestmark = pytest.mark.skipif(C.renderer() is None, reason=C.SKIP_REASON)

NAMESPACED = {"watch": {"allNamespaces": False, "namespaces": ["team-a", "team-b"]}, "replicaCount": 1}
EVERYTHING = {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
              "grafanaDashboard": {"enabled": True}, "trainer": {"defaultOutputRoot": "pvc://shared/outputs",
                                                                  "hfTokenSecret": "hf-token/token",
                                                                  "stagingClaim": "hf-cache",
                                                                  "progress": {"namespacesPrepared": True}}}
# Kinds that are not part of Kubernetes: their CRDs come from the chart (kopf) or from the Prometheus Operator.
THIRD_PARTY = {("kopf.dev/v1", "ClusterKopfPeering"), ("kopf.dev/v1", "KopfPeering"),
               ("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
K8S_VERSIONS = ("1.30.0", "1.37.0")  # Chart.yaml kubeVersion floor, and the newest schemas bundled


@pytest.fixture(scope="module", params=["default", "namespaced", "everything"])
def rendered(request):
    values = {"default": {}, "namespaced": NAMESPACED, "everything": EVERYTHING}[request.param]
    return request.param, C.render(values)


def test_lint_is_clean():
    assert C.lint() == []
    assert C.lint(NAMESPACED) == []


def test_every_object_validates_against_kubernetes_schemas(rendered):
    name, objects = rendered
    for source, doc in objects:
        key = (doc["apiVersion"], doc["kind"])
        if key in THIRD_PARTY or (name != "default" and doc["kind"] == "CustomResourceDefinition"):
            continue  # CRDs do not depend on the values: validated once
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{source}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: "
                            f"{exc.message if hasattr(exc, 'message') else str(exc)[:500]}")


def test_objects_are_unique_and_namespaced_where_needed(rendered):
    _, objects = rendered
    seen = set()
    cluster_kinds = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    for _, doc in objects:
        meta = doc["metadata"]
        key = (doc["kind"], meta.get("namespace"), meta["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        assert ("namespace" in meta) == (doc["kind"] not in cluster_kinds), key


def operator_container(objects) -> dict:
    (deployment,) = C.by_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_operator_pod_is_locked_down(rendered):
    _, objects = rendered
    (deployment,) = C.by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(objects)
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]  # the only writable path


def test_liveness_probe_targets_the_liveness_endpoint(rendered):
    _, objects = rendered
    container = operator_container(objects)
    probe = container["livenessProbe"]["httpGet"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}[probe["port"]]
    assert f"--liveness=http://0.0.0.0:{port}{probe['path']}" in container["args"]
    metrics = {p["name"]: p["containerPort"] for p in container["ports"]}.get("metrics")
    assert f"--metrics-port={metrics}" in container["args"]


def operator_parser():
    """The real `branchmerge operator` argument parser (the operator's CLI module)."""
    try:
        module = importlib.import_module("branchmerge.commands.operator")
    except ImportError:
        pytest.skip("branchmerge.commands.operator does not exist yet: operator flags not checked")
    parser = argparse.ArgumentParser(prog="branchmerge")
    module.register(parser.add_subparsers(dest="command"))
    return parser


def test_operator_accepts_the_rendered_arguments(rendered):
    _, objects = rendered
    args = operator_container(objects)["args"]
    parsed = operator_parser().parse_args(args)  # SystemExit (exit 2) on a flag the operator does not know
    assert parsed.command == "operator"


def test_rbac_mode_follows_watch_settings(rendered):
    name, objects = rendered
    roles, cluster_roles = C.by_kind(objects, "Role"), C.by_kind(objects, "ClusterRole")
    peerings = C.by_kind(objects, "KopfPeering") + C.by_kind(objects, "ClusterKopfPeering")
    if name == "namespaced":
        operator_roles = [r for r in roles if r["metadata"]["name"] == "bm-branchmerge"]
        assert sorted(r["metadata"]["namespace"] for r in operator_roles) == ["team-a", "team-b"]
        assert sorted((p["kind"], p["metadata"]["namespace"]) for p in peerings) == [
            ("KopfPeering", "team-a"), ("KopfPeering", "team-b")]
        # no ClusterRole grants anything: edit/view only aggregate into the built-in user roles
        assert sorted(c["metadata"]["name"] for c in cluster_roles) == ["bm-branchmerge-edit", "bm-branchmerge-view"]
        assert not C.by_kind(objects, "ClusterRoleBinding")
        stage_sas = [s["metadata"]["namespace"] for s in C.by_kind(objects, "ServiceAccount")
                     if s["metadata"]["name"] == "branchmerge-progress"]
        assert sorted(stage_sas) == ["team-a", "team-b"]
        args = operator_container(objects)["args"]
        assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    else:
        assert not roles
        assert "bm-branchmerge-progress" in [c["metadata"]["name"] for c in cluster_roles]
        assert [p["kind"] for p in peerings] == ["ClusterKopfPeering"]
        assert "--all-namespaces" in operator_container(objects)["args"]
    assert all(p["metadata"]["name"] == "branchmerge" for p in peerings)
    assert "--peering=branchmerge" in operator_container(objects)["args"]


def rule_set(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule.get("apiGroups", []) for r in rule.get("resources", [])
            for v in rule.get("verbs", [])}


def _plain_rules(filename: str, kind: str) -> set[tuple[str, str, str]]:
    from .helpers import load_yaml_docs

    path = DEPLOY / "rbac" / filename
    if not path.exists():
        pytest.skip(f"deploy/rbac/{filename} does not exist")
    return rule_set([r for d in load_yaml_docs(path) if d["kind"] == kind for r in d["rules"]])


def _chart_rules(values: dict, kind: str, name: str) -> set[tuple[str, str, str]]:
    roles = [d for d in C.by_kind(C.render(values), kind) if d["metadata"]["name"] == name]
    assert roles, f"no {kind} {name}"
    return rule_set([r for d in roles for r in d["rules"]])


def test_operator_rbac_equals_the_plain_manifests():
    """deploy/rbac/ (kubectl installs; checked against every request in the operator's integration tests)
    and the chart grant exactly the same verbs, in both modes and to the stage pods."""
    assert _chart_rules({}, "ClusterRole", "bm-branchmerge") == _plain_rules("operator-clusterwide.yaml", "ClusterRole")
    assert _chart_rules(NAMESPACED, "Role", "bm-branchmerge") == _plain_rules("operator-namespaced.yaml", "Role")
    assert _chart_rules(NAMESPACED, "Role", "bm-branchmerge-progress") == \
        _plain_rules("progress-reporter.yaml", "Role")
    assert _chart_rules({}, "ClusterRole", "bm-branchmerge-progress") == \
        _plain_rules("progress-reporter.yaml", "Role")


def test_plain_operator_uses_the_service_accounts_deploy_rbac_binds():
    from .helpers import load_yaml_docs

    docs = load_yaml_docs(DEPLOY / "operator" / "operator.yaml")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    namespace = deployment["metadata"]["namespace"]
    rbac = [d for p in sorted((DEPLOY / "rbac").glob("*.yaml")) for d in load_yaml_docs(p)]
    bound = {(s["name"], s.get("namespace")) for d in rbac if d["kind"].endswith("Binding") for s in d["subjects"]}
    assert (sa, namespace) in bound
    # cluster-wide, live progress needs the ServiceAccount in every tenant namespace first: off by default
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--progress-service-account") for a in args)
    assert "branchmerge-progress" in {d["metadata"]["name"] for d in rbac if d["kind"] == "ServiceAccount"}


def test_live_progress_only_where_the_service_account_exists():
    flag = "--progress-service-account=branchmerge-progress"
    assert flag not in operator_container(C.render())["args"]  # cluster-wide: tenants not prepared yet
    assert flag in operator_container(C.render(NAMESPACED))["args"]  # the chart creates it per namespace
    assert flag in operator_container(C.render(EVERYTHING))["args"]  # the administrator said so
    assert flag not in operator_container(C.render({**NAMESPACED, "trainer": {"progress": {"enabled": False}}}))["args"]


@pytest.mark.parametrize("values", [{}, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_stage_service_account_can_only_patch_status(values):
    objects = C.render(values)
    stage_roles = [r for r in C.by_kind(objects, "Role") + C.by_kind(objects, "ClusterRole")
                   if r["metadata"]["name"].endswith("-progress")]
    assert stage_roles
    for role in stage_roles:
        triples = rule_set(role["rules"])
        assert {r for _, r, _ in triples} == {f"{p}/status" for p in ("teachergens", "branchsfts", "merges", "evals")}
        assert {v for _, _, v in triples} == {"patch"}
    for binding in C.by_kind(objects, "RoleBinding"):
        if binding["metadata"]["name"].endswith("-progress"):
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "branchmerge-progress",
                                            "namespace": binding["metadata"]["namespace"]}]


def test_crds_rendered_from_the_generated_files_and_kept():
    objects = C.render()
    crds = C.by_kind(objects, "CustomResourceDefinition")
    generated = {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert len(crds) == len(generated) == 4
    for crd in crds:
        (source,) = [g for g in generated.values() if g["metadata"]["name"] == crd["metadata"]["name"]]
        assert crd["spec"] == source["spec"], "the schema reaches the cluster unchanged"
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not C.by_kind(C.render({"crds": {"install": False}}), "CustomResourceDefinition")
    kept = C.by_kind(C.render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert all("helm.sh/resource-policy" not in (c["metadata"].get("annotations") or {}) for c in kept)


def test_disruption_budget_only_with_several_replicas():
    assert C.by_kind(C.render({"replicaCount": 2}), "PodDisruptionBudget")
    assert not C.by_kind(C.render({"replicaCount": 1}), "PodDisruptionBudget")


def test_monitoring_objects():
    objects = C.render(EVERYTHING)
    (monitor,) = C.by_kind(objects, "ServiceMonitor")
    (service,) = C.by_kind(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    (rule,) = C.by_kind(objects, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"BranchmergeOperatorDown", "BranchmergeStageFailed", "BranchmergeStuckPending",
                           "BranchmergeStuckWaiting", "BranchmergeReconcileErrors"}
    assert f'job="{service["metadata"]["name"]}"' in alerts["BranchmergeOperatorDown"]["expr"]
    assert alerts["BranchmergeStuckPending"]["for"] == "1h"
    (dashboard,) = [c for c in C.by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["branchmerge.json"]) == json.loads(
        (CHART / "dashboards" / "branchmerge.json").read_text(encoding="utf-8"))
    assert not C.by_kind(C.render(), "PrometheusRule") and not C.by_kind(C.render(), "ServiceMonitor")


def test_trainer_defaults_reach_the_operator():
    args = operator_container(C.render(EVERYTHING))["args"]
    for expected in ("--image=ghcr.io/branchmerge/trainer:0.1.0", "--default-output-root=pvc://shared/outputs",
                     "--hf-token-secret=hf-token/token", "--staging-claim=hf-cache",
                     "--progress-service-account=branchmerge-progress"):
        assert expected in args
    digest = "sha256:" + "a" * 64
    args = operator_container(C.render({"trainer": {"image": {"repository": "r/t", "digest": digest}}}))["args"]
    assert f"--image=r/t@{digest}" in args


def test_values_schema_is_enforced_at_render_time():
    with pytest.raises(C.RenderError, match="replicaCount"):
        C.render({"replicaCount": 0})


@pytest.mark.skipif(C.renderer() != "helm-python-sdk", reason="NOTES.txt is only rendered by helm-python-sdk here")
def test_notes_tell_what_to_do_next():
    text = C.notes(NAMESPACED)
    assert "team-a, team-b" in text
    assert "kubectl apply -n <namespace> -f examples/tinyr1/" in text
    assert "docs/operations.md" in text


def test_plain_kubectl_manifests_are_the_rendered_chart():
    """deploy/operator/operator.yaml is the chart's default render written out (scripts/render_plain.py)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(CHART / "scripts" / "render_plain.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
