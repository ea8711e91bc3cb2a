"""The chart rendered by real Helm (the binary or helm-python-sdk; the tests fail, saying what to install,
when neither exists) with default, namespaced and all-features values; every object validated against the Kubernetes
OpenAPI schemas."""
from __future__ import annotations

import argparse
import importlib
import json

import kubernetes_validate
import pytest
import yaml

from branchmerge.api.resources import KIND_INFO

from . import chart as C
from .helpers import CHART, DEPLOY

NAMESPACED = {"watch": {"allNamespaces": False, "namespaces": ["team-a", "team-b"]}, "replicaCount": 1}
EVERYTHING = {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
              "grafanaDashboard": {"enabled": True}, "trainer": {"defaultOutputRoot": "pvc://shared/outputs",
                                                                  "hfTokenSecret": "hf-token/token",
                                                                  "stagingClaim": "hf-cache",
                                                                  "progress": {"port": 9443, "interval": 2.5}}}
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
    """The real `branchmerge operator` argument parser (the operator's CLI module; an ImportError fails)."""
    module = importlib.import_module("branchmerge.commands.operator")
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
        # edit/view only aggregate into the built-in user roles; the one cluster-wide grant is TokenReview
        # (cluster-scoped: live progress reports are authenticated with it)
        assert sorted(c["metadata"]["name"] for c in cluster_roles) == [
            "bm-branchmerge-edit", "bm-branchmerge-tokenreview", "bm-branchmerge-view"]
        (tokenreview,) = [c for c in cluster_roles if c["metadata"]["name"] == "bm-branchmerge-tokenreview"]
        assert rule_set(tokenreview["rules"]) == {TOKEN_REVIEW}
        assert [b["metadata"]["name"] for b in C.by_kind(objects, "ClusterRoleBinding")] == ["bm-branchmerge-tokenreview"]
        args = operator_container(objects)["args"]
        assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    else:
        assert not roles
        assert [b["metadata"]["name"] for b in C.by_kind(objects, "ClusterRoleBinding")] == ["bm-branchmerge"]
        assert [p["kind"] for p in peerings] == ["ClusterKopfPeering"]
        assert "--all-namespaces" in operator_container(objects)["args"]
    assert all(p["metadata"]["name"] == "branchmerge" for p in peerings)
    assert "--peering=branchmerge" in operator_container(objects)["args"]


TOKEN_REVIEW = ("authentication.k8s.io", "tokenreviews", "create")
PROGRESS_FLAGS = {"--progress-url", "--progress-port", "--progress-interval"}


def rule_set(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule.get("apiGroups", []) for r in rule.get("resources", [])
            for v in rule.get("verbs", [])}


def _plain_rules(filename: str, kind: str) -> set[tuple[str, str, str]]:
    from .helpers import load_yaml_docs

    path = DEPLOY / "rbac" / filename
    assert path.exists(), f"deploy/rbac/{filename} does not exist"
    return rule_set([r for d in load_yaml_docs(path) if d["kind"] == kind for r in d["rules"]])


def _chart_rules(values: dict, kind: str, name: str) -> set[tuple[str, str, str]]:
    roles = [d for d in C.by_kind(C.render(values), kind) if d["metadata"]["name"] == name]
    assert roles, f"no {kind} {name}"
    return rule_set([r for d in roles for r in d["rules"]])


def test_operator_rbac_equals_the_plain_manifests():
    """deploy/rbac/ (kubectl installs; checked against every request in the operator's integration tests)
    and the chart grant exactly the same verbs, in both modes (TokenReview included)."""
    assert _chart_rules({}, "ClusterRole", "bm-branchmerge") == _plain_rules("operator-clusterwide.yaml", "ClusterRole")
    assert _chart_rules(NAMESPACED, "Role", "bm-branchmerge") == _plain_rules("operator-namespaced.yaml", "Role")
    assert _chart_rules(NAMESPACED, "ClusterRole", "bm-branchmerge-tokenreview") == \
        _plain_rules("operator-namespaced.yaml", "ClusterRole") == {TOKEN_REVIEW}


def _bound_rules(objects, service_account: str, namespace: str = C.NAMESPACE) -> set[tuple[str, str, str]]:
    """Every (group, resource, verb) the chart grants ``service_account`` through its (Cluster)RoleBindings."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in C.by_kind(objects, "Role") + C.by_kind(objects, "ClusterRole")}
    granted = set()
    for binding in C.by_kind(objects, "RoleBinding") + C.by_kind(objects, "ClusterRoleBinding"):
        if {"kind": "ServiceAccount", "name": service_account, "namespace": namespace} not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        scope = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        granted |= rule_set(roles[(ref["kind"], scope, ref["name"])]["rules"])
    return granted


@pytest.mark.parametrize("values", [{}, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_operator_may_authenticate_progress_reports(values):
    """TokenReview (cluster-scoped, so a ClusterRole binding in both modes) and get on pods (the reporting pod's
    owner chain); nothing more for live progress."""
    objects = C.render(values)
    granted = _bound_rules(objects, "bm-branchmerge")
    assert TOKEN_REVIEW in granted and ("", "pods", "get") in granted
    cluster_bound = set()
    for binding in C.by_kind(objects, "ClusterRoleBinding"):
        (role,) = [r for r in C.by_kind(objects, "ClusterRole") if r["metadata"]["name"] == binding["roleRef"]["name"]]
        cluster_bound |= rule_set(role["rules"])
    assert TOKEN_REVIEW in cluster_bound
    disabled = C.render({**values, "trainer": {"progress": {"enabled": False}}})
    assert TOKEN_REVIEW not in _bound_rules(disabled, "bm-branchmerge")


def test_plain_operator_uses_the_service_accounts_deploy_rbac_binds():
    from .helpers import load_yaml_docs

    docs = load_yaml_docs(DEPLOY / "operator" / "operator.yaml")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    namespace = deployment["metadata"]["namespace"]
    rbac = [d for p in sorted((DEPLOY / "rbac").glob("*.yaml")) for d in load_yaml_docs(p)]
    bound = {(s["name"], s.get("namespace")) for d in rbac if d["kind"].endswith("Binding") for s in d["subjects"]}
    assert (sa, namespace) in bound
    # live progress is on: it needs nothing in the tenants' namespaces, only the operator's Service
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--progress-url=http://branchmerge.branchmerge-system.svc:8082/progress" in args
    assert {a.split("=")[0] for a in args if a.startswith("--progress")} == PROGRESS_FLAGS
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "branchmerge"]
    assert service["metadata"]["namespace"] == namespace
    assert {"name": "progress", "port": 8082, "targetPort": "progress", "protocol": "TCP"} in service["spec"]["ports"]
    # the only ServiceAccount is the operator's: stage pods run without API credentials
    assert {d["metadata"]["name"] for d in rbac if d["kind"] == "ServiceAccount"} == {sa}


@pytest.mark.parametrize("values,port,interval", [({}, 8082, "10"), (NAMESPACED, 8082, "10"),
                                                  (EVERYTHING, 9443, "2.5")],
                         ids=["cluster-wide", "namespaced", "everything"])
def test_live_progress_endpoint_is_served_and_reachable(values, port, interval):
    """The operator listens on the progress port, a Service in the release namespace exposes it, and the URL
    the operator hands the stage pods is that Service's DNS name and port."""
    for namespace in (C.NAMESPACE, "ops"):
        objects = C.render(values, namespace=namespace)
        container = operator_container(objects)
        args = container["args"]
        url = f"http://bm-branchmerge.{namespace}.svc:{port}/progress"
        assert f"--progress-url={url}" in args
        assert f"--progress-port={port}" in args
        assert f"--progress-interval={interval}" in args
        parsed = operator_parser().parse_args(args)
        assert (parsed.progress_url, parsed.progress_port, parsed.progress_interval) == (url, port, float(interval))
        assert {"name": "progress", "containerPort": port, "protocol": "TCP"} in container["ports"]
        (service,) = [s for s in C.by_kind(objects, "Service") if s["metadata"]["name"] == "bm-branchmerge"]
        assert service["metadata"]["namespace"] == namespace
        assert service["spec"]["ports"] == [{"name": "progress", "port": port, "targetPort": "progress",
                                             "protocol": "TCP"}]
        (deployment,) = C.by_kind(objects, "Deployment")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()


def test_live_progress_can_be_turned_off():
    objects = C.render({**NAMESPACED, "trainer": {"progress": {"enabled": False}}})
    container = operator_container(objects)
    assert not any(a.startswith("--progress") for a in container["args"])
    assert "progress" not in {p["name"] for p in container["ports"]}
    assert "bm-branchmerge" not in {s["metadata"]["name"] for s in C.by_kind(objects, "Service")}
    assert not [c for c in C.by_kind(objects, "ClusterRole") if c["metadata"]["name"].endswith("-tokenreview")]


@pytest.mark.parametrize("values", [{}, NAMESPACED, EVERYTHING], ids=["cluster-wide", "namespaced", "everything"])
def test_no_stage_rbac(values):
    """Stage pods get no API credentials: the chart renders no ServiceAccount, Role or binding for them, and no
    role but the operator's may write the kinds' status."""
    objects = C.render(values)
    assert [s["metadata"]["name"] for s in C.by_kind(objects, "ServiceAccount")] == ["bm-branchmerge"]
    for role in C.by_kind(objects, "Role") + C.by_kind(objects, "ClusterRole"):
        assert not role["metadata"]["name"].endswith("-progress")
        if any(r.endswith("/status") and v not in ("get", "list", "watch") for _, r, v in rule_set(role["rules"])):
            assert role["metadata"]["name"] == "bm-branchmerge", role["metadata"]["name"]
    for binding in C.by_kind(objects, "RoleBinding") + C.by_kind(objects, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "bm-branchmerge",
                                        "namespace": C.NAMESPACE}], binding["metadata"]["name"]
    # the operator's progress flags are only those of the endpoint: none names an identity for the stage pods
    assert {a.split("=")[0] for a in operator_container(objects)["args"] if a.startswith("--progress")} == PROGRESS_FLAGS
    assert not (CHART / "templates" / "stage-rbac.yaml").exists()


def test_crds_rendered_from_the_generated_files_and_kept():
    objects = C.render()
    crds = C.by_kind(objects, "CustomResourceDefinition")
    generated = {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert len(crds) == len(generated) == len(KIND_INFO)
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
    (service,) = [s for s in C.by_kind(objects, "Service") if s["metadata"]["name"] == "bm-branchmerge-metrics"]
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
                     "--progress-url=http://bm-branchmerge.branchmerge-system.svc:9443/progress"):
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
    assert "service bm-branchmerge" in text and "port 8082" in text  # live progress: nothing to prepare
    assert "namespacesPrepared" not in text and "ClusterRole" not in text


def test_plain_kubectl_manifests_are_the_rendered_chart():
    """deploy/operator/operator.yaml is the chart's default render written out (scripts/render_plain.py)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(CHART / "scripts" / "render_plain.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
