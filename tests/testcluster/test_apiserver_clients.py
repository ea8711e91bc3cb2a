"""Other clients against the API-server stand-in: the operator tests' blocking ``emulator.Api`` helper
unchanged, the kubeconfig it writes (kopf's login, the ``branchmerge operator --kubeconfig`` login, the
official kubernetes client), and the audit set RBAC checks read."""
from __future__ import annotations

import asyncio

import pytest
from .apiserver_helpers import MERGES, call, configmap, example

from testcluster import ApiServer


@pytest.fixture(scope="module")
def server():
    with ApiServer(gc="background") as srv:
        yield srv


def test_emulator_api_helper_works_unchanged(server):
    from branchmerge.operator.emulator import Api

    api = Api(server.url)
    merge = example("02-merge-methods/ties.yaml")[0]
    created = api.create(merge)
    assert created["metadata"]["uid"] and created["spec"]["dtype"]
    assert api.get("Merge", "default", merge["metadata"]["name"])["kind"] == "Merge"
    assert [m["metadata"]["name"] for m in api.list("Merge", "default")] == [merge["metadata"]["name"]]
    patched = api.patch("Merge", "default", merge["metadata"]["name"], {"status": {"phase": "Running"}}, sub="status")
    assert patched["status"]["phase"] == "Running"
    api.patch("Merge", "default", merge["metadata"]["name"],
              [{"op": "add", "path": "/metadata/labels", "value": {"x": "y"}}])
    assert api.get("Merge", "default", merge["metadata"]["name"])["metadata"]["labels"] == {"x": "y"}
    cm = api.create(configmap("via-api"))
    assert cm["data"] == {"k": "v"} and api.list("ConfigMap", "default")[0]["metadata"]["name"] == "via-api"
    api.delete("Merge", "default", merge["metadata"]["name"])
    assert api.get("Merge", "default", merge["metadata"]["name"]) is None


def test_kubeconfig_logs_in_kopf_the_operator_command_and_the_official_client(server, tmp_path, monkeypatch):
    import kopf
    import kubernetes

    from branchmerge.commands.operator import _connector

    path = server.write_kubeconfig(tmp_path / "kubeconfig", namespace="default")
    monkeypatch.setenv("KUBECONFIG", str(path))
    info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    assert info.server == server.url and info.default_namespace == "default"
    info = asyncio.run(_connector(str(path))())
    assert info.server == server.url
    client = kubernetes.config.new_client_from_config(config_file=str(path))
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespaced_config_map("default", {"metadata": {"name": "official"}, "data": {"a": "b"}})
    names = [c.metadata.name for c in core.list_namespaced_config_map("default").items]
    assert "official" in names
    assert core.read_namespace("default").status.phase == "Active"
    custom = kubernetes.client.CustomObjectsApi(client)
    doc = example("02-merge-methods/ties.yaml")[0]
    doc["metadata"]["name"] = "official-merge"
    custom.create_namespaced_custom_object("branchmerge.dev", "v1alpha1", "default", "merges", doc)
    got = custom.get_namespaced_custom_object("branchmerge.dev", "v1alpha1", "default", "merges", "official-merge")
    assert got["spec"]["seed"] == 0
    client.close()


def test_audit_records_client_verb_group_resource(server):
    call(server.url, "create", "v1", "configmaps", "default", configmap("audited"))
    call(server.url, "patch", MERGES, "merges", "default", "absent", {"status": {}}, sub="status")
    call(server.url, "list", "batch/v1", "jobs", "default")
    audit = server.audit
    assert ("pytest", "create", "", "configmaps") in audit
    assert ("pytest", "patch", "branchmerge.dev", "merges/status") in audit
    assert ("pytest", "list", "batch", "jobs") in audit
