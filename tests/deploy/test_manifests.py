"""Every manifest that is applied as written (crds/, deploy/, docs/examples/, the YAML blocks of the docs,
the examples' built-in objects) validates against the Kubernetes OpenAPI schemas bundled with
kubernetes-validate (offline), or against the branchmerge API models for the project's own kinds."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from branchmerge.api.resources import KIND_INFO
from branchmerge.api.validation import parse_resource

from .helpers import CHART, CRDS, DEPLOY, DOCS, HEALTH_LUA, REPO

K8S_VERSIONS = ("1.30.0", "1.37.0")
# Kinds whose schemas are not part of Kubernetes: checked for the fields this project relies on instead.
THIRD_PARTY_REQUIRED = {
    ("argoproj.io/v1alpha1", "Application"): ("spec.source.repoURL", "spec.source.path", "spec.destination.namespace"),
    ("source.toolkit.fluxcd.io/v1", "GitRepository"): ("spec.url", "spec.interval"),
    ("kustomize.toolkit.fluxcd.io/v1", "Kustomization"): ("spec.path", "spec.sourceRef.name", "spec.interval"),
    ("helm.toolkit.fluxcd.io/v2", "HelmRelease"): ("spec.chart.spec.chart", "spec.chart.spec.sourceRef.name"),
    ("kueue.x-k8s.io/v1beta1", "ResourceFlavor"): ("metadata.name",),
    ("kueue.x-k8s.io/v1beta1", "ClusterQueue"): ("spec.resourceGroups",),
    ("kueue.x-k8s.io/v1beta1", "LocalQueue"): ("spec.clusterQueue",),
    ("kopf.dev/v1", "ClusterKopfPeering"): ("metadata.name",),
    ("kopf.dev/v1", "KopfPeering"): ("metadata.name", "metadata.namespace"),
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): ("spec.leaderWorkerTemplate.size",
                                                         "spec.leaderWorkerTemplate.workerTemplate.spec.containers"),
}
# Pod templates inside third-party kinds, validated as Kubernetes PodTemplates.
THIRD_PARTY_POD_TEMPLATES = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): ("spec.leaderWorkerTemplate.leaderTemplate",
                                                         "spec.leaderWorkerTemplate.workerTemplate"),
}
# YAML 1.1 booleans as Go's sigs.k8s.io/yaml (kubectl, Helm) reads them: an unquoted key `n:` becomes "false".
GO_YAML_BOOLS = {"y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "true", "True", "TRUE", "false",
                 "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF"}


def manifest_files() -> list[Path]:
    files = sorted(CRDS.glob("*.yaml")) + sorted(DEPLOY.rglob("*.yaml")) + sorted((DOCS / "examples").glob("*.yaml"))
    return [f for f in files if not f.name.startswith("values-")]


def docs_yaml_blocks() -> list[tuple[str, str]]:
    out = []
    for md in sorted(DOCS.glob("*.md")):
        text = md.read_text(encoding="utf-8")
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", text, re.S)):
            out.append((f"{md.name}#yaml{i}", block))
    return out


def _get(doc: dict, dotted: str):
    node = doc
    for key in dotted.split("."):
        node = node[key]
    return node


def check_object(doc: dict, where: str) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key[0] == "branchmerge.dev/v1alpha1":
        parse_resource(doc)  # the API models: same rules as `branchmerge validate`
        return
    if key in THIRD_PARTY_REQUIRED:
        for field in THIRD_PARTY_REQUIRED[key]:
            try:
                _get(doc, field)
            except (KeyError, TypeError):
                pytest.fail(f"{where}: {key[1]} lacks {field}")
        for field in THIRD_PARTY_POD_TEMPLATES.get(key, ()):
            template = _get(doc, field)
            check_object({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
                         f"{where} {field}")
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.utils.SchemaNotFoundError:
            pytest.fail(f"{where}: {key} is neither a Kubernetes kind nor a known third-party kind")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {key[1]}/{doc['metadata'].get('name')} invalid for Kubernetes {version}: "
                        f"{getattr(exc, 'message', str(exc))[:400]}")


# The files users apply as written: a missing one fails here (a glob over a missing folder would only give the
# parametrised tests below an empty set, which pytest reports as a skip).
REQUIRED_FILES = ("deploy/operator/operator.yaml", "deploy/rbac/operator-clusterwide.yaml",
                  "deploy/rbac/operator-namespaced.yaml", "deploy/argocd/health.lua",
                  "crds/kopf.dev_clusterkopfpeerings.yaml", "crds/kopf.dev_kopfpeerings.yaml",
                  *(f"crds/branchmerge.dev_{info.plural}.yaml" for info in KIND_INFO.values()))


def test_every_applied_manifest_exists():
    missing = [f for f in REQUIRED_FILES if not (REPO / f).is_file()]
    assert missing == [], f"missing manifests (users apply them as written): {missing}"
    assert manifest_files(), "no manifest found under crds/, deploy/, docs/examples/"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_manifest_file_validates(path):
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    assert docs, f"{path} holds no object"
    for doc in docs:
        check_object(doc, str(path.relative_to(REPO)))


def test_docs_yaml_blocks_validate():
    blocks = docs_yaml_blocks()
    assert blocks, "docs/operations.md shows YAML examples"
    for where, block in blocks:
        for doc in yaml.safe_load_all(block):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                check_object(doc, where)


def test_builtin_objects_in_examples_validate():
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("apiVersion") and "branchmerge.dev" not in doc["apiVersion"]:
                check_object(doc, str(path.relative_to(REPO)))


def _go_yaml_bool_keys(text: str) -> list[str]:
    found = []

    def walk(node):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.style is None and key.value in GO_YAML_BOOLS:
                    found.append(f"line {key.start_mark.line + 1}: {key.value}")
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    for node in yaml.compose_all(text):
        walk(node)
    return found


def applied_yaml_files() -> list[Path]:
    return manifest_files() + sorted((REPO / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("path", applied_yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_key_that_kubectl_reads_as_a_boolean(path):
    found = _go_yaml_bool_keys(path.read_text(encoding="utf-8"))
    assert found == [], f"kubectl and Helm would read these keys as booleans: {found}"


def test_example_values_files_validate_against_the_chart_schema():
    import json

    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    files = sorted((DOCS / "examples").glob("values-*.yaml"))
    assert files
    for path in files:
        jsonschema.Draft7Validator(schema).validate(yaml.safe_load(path.read_text(encoding="utf-8")))


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed: the Argo CD install command is not run")
def test_argocd_health_install_command_from_the_docs():
    """The docs' jq command builds the argocd-cm patch from the single Lua file, for every kind."""
    import json

    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    match = re.search(r"^(jq -n --rawfile lua .*?) > \S+$", text, re.M | re.S)
    assert match, "docs/operations.md has the jq command"
    command = match.group(1).replace("\\\n", " ")
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
    patch = json.loads(proc.stdout)
    lua = HEALTH_LUA.read_text(encoding="utf-8")
    assert patch["data"] == {f"resource.customizations.health.branchmerge.dev_{kind}": lua
                             for kind in KIND_INFO}
