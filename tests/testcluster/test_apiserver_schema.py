"""Structural-schema features the committed CRDs do not use yet, on a synthetic CRD installed at run time:
int-or-string, embedded resources, preserve-unknown-fields, nullable, list-type set/map, formats, the
Kubernetes CEL libraries emulated over the Rust ``cel`` package, and update ratcheting."""
from __future__ import annotations

import copy

import pytest
from .apiserver_helpers import call, crd

from testcluster import ApiError, ApiServer

GV = "example.com/v1"

WIDGET_SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "x-kubernetes-validations": [
                {"rule": "self.name.lowerAscii() == self.name", "message": "name must be lower case"},
                {"rule": "quantity(self.memory).isLessThan(quantity('64Gi'))", "message": "too much memory"},
                {"rule": "self.tags.isSorted()", "messageExpression": "'tags not sorted: ' + self.tags.join(',')"},
            ],
            "properties": {
                "name": {"type": "string", "default": "w"},
                "memory": {"type": "string", "default": "1Gi"},
                "port": {"x-kubernetes-int-or-string": True},
                "ratio": {"type": "number", "x-kubernetes-validations": [
                    {"rule": "self * 2.0 <= 2.0", "message": "ratio at most 1"}]},
                "count": {"type": "integer", "format": "int32", "nullable": True, "default": 3},
                "stamp": {"type": "string", "format": "date-time"},
                "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set",
                         "default": []},
                "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                          "items": {"type": "object", "required": ["name"], "properties": {
                              "name": {"type": "string"}, "port": {"type": "integer", "maximum": 65535},
                              "protocol": {"type": "string", "default": "TCP"}}}},
                "template": {"type": "object", "x-kubernetes-embedded-resource": True,
                             "x-kubernetes-preserve-unknown-fields": True},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                          "properties": {"known": {"type": "integer"}}},
                "limits": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
                "strict": {"type": "string", "maxLength": 3},
            },
        },
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}


def widget_crd(schema: dict = WIDGET_SCHEMA) -> dict:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                     "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "listKind": "WidgetList"},
                     "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                                   "schema": {"openAPIV3Schema": copy.deepcopy(schema)}}]}}


@pytest.fixture(scope="module")
def server():
    with ApiServer(gc="off") as srv:
        srv.install_crd(widget_crd())
        yield srv


def widget(object_name: str, **spec) -> dict:
    return {"apiVersion": GV, "kind": "Widget", "metadata": {"name": object_name}, "spec": spec}


def causes(server, doc) -> dict[str, dict]:
    with pytest.raises(ApiError) as err:
        call(server.url, "create", GV, "widgets", "default", doc)
    assert err.value.status == 422, err.value
    return {c["field"]: c for c in err.value.body["details"]["causes"]}


def test_defaults_pruning_and_preserved_fields(server):
    doc = widget("a", port="http", count=None, ports=[{"name": "p", "port": 80}],
                 template={"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "bogus": 1},
                           "spec": {"anything": True}},
                 extra={"known": 1, "free": {"form": [1]}}, limits={"cpu": 2}, junk=1)
    got = call(server.url, "create", GV, "widgets", "default", doc)
    spec = got["spec"]
    assert spec["name"] == "w" and spec["memory"] == "1Gi" and spec["tags"] == []
    assert spec["count"] is None  # nullable: an explicit null stays
    assert spec["ports"] == [{"name": "p", "port": 80, "protocol": "TCP"}]
    assert spec["template"] == {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                                "spec": {"anything": True}}
    assert spec["extra"] == {"known": 1, "free": {"form": [1]}} and "junk" not in spec
    assert spec["port"] == "http" and call(server.url, "create", GV, "widgets", "default",
                                           widget("b", port=8080))["spec"]["port"] == 8080
    assert "count" in call(server.url, "create", GV, "widgets", "default", widget("c"))["spec"]


def test_schema_errors(server):
    found = causes(server, widget("bad", port=1.5, tags=["x", "x"], ports=[{"name": "p"}, {"name": "p"}],
                                  limits={"cpu": -1}, strict="toolong", count=2**40, stamp="yesterday"))
    assert found["spec.port"]["reason"] == "FieldValueTypeInvalid"
    assert found["spec.tags[1]"]["reason"] == "FieldValueDuplicate"
    assert found["spec.ports[1]"]["reason"] == "FieldValueDuplicate"
    assert found["spec.limits.cpu"]["reason"] == "FieldValueInvalid"
    assert found["spec.strict"]["reason"] == "FieldValueTooLong"
    assert "int32" in found["spec.count"]["message"] and "date-time" in found["spec.stamp"]["message"]


def test_kubernetes_cel_libraries(server):
    with pytest.raises(ApiError) as err:
        call(server.url, "create", GV, "widgets", "default",
             widget("cel", name="Upper", memory="128Gi", tags=["b", "a"], ratio=3))
    found = [(c["field"], c["message"]) for c in err.value.body["details"]["causes"]]
    assert ("spec", 'Invalid value: "object": name must be lower case') in found
    assert ("spec", 'Invalid value: "object": too much memory') in found
    assert ("spec", 'Invalid value: "object": tags not sorted: b,a') in found  # messageExpression
    assert ("spec.ratio", 'Invalid value: "number": ratio at most 1') in found  # JSON 3 typed as a double
    ok = call(server.url, "create", GV, "widgets", "default", widget("cel-ok", memory="512Mi", tags=["a", "b"],
                                                                      ratio=1))
    assert ok["spec"]["ratio"] == 1


def test_updates_ratchet_unchanged_invalid_values():
    loose = copy.deepcopy(WIDGET_SCHEMA)
    loose["properties"]["spec"]["properties"]["strict"]["maxLength"] = 10
    with ApiServer(gc="off") as srv:
        srv.install_crd(widget_crd(loose))
        call(srv.url, "create", GV, "widgets", "default", widget("r", strict="longer"))
        srv.install_crd(widget_crd())  # the schema tightens: the stored value is now invalid
        status = call(srv.url, "patch", GV, "widgets", "default", "r", {"status": {"seen": True}}, sub="status")
        assert status["status"] == {"seen": True}
        label = call(srv.url, "patch", GV, "widgets", "default", "r", {"metadata": {"labels": {"a": "b"}}})
        assert label["metadata"]["labels"] == {"a": "b"}
        with pytest.raises(ApiError) as err:  # a changed value is validated
            call(srv.url, "patch", GV, "widgets", "default", "r", {"spec": {"strict": "longest"}})
        assert err.value.status == 422


def test_crds_can_be_created_over_http_and_served_at_once():
    with ApiServer(crds_dir=None, gc="off") as srv:
        with pytest.raises(ApiError) as err:
            call(srv.url, "request", "GET", "/apis/example.com/v1")
        assert err.value.status == 404
        created = call(srv.url, "create", "apiextensions.k8s.io/v1", "customresourcedefinitions", None, widget_crd())
        assert created["status"]["conditions"][0]["type"] == "Established"
        assert call(srv.url, "create", GV, "widgets", "default", widget("w"))["spec"]["name"] == "w"
        call(srv.url, "delete", "apiextensions.k8s.io/v1", "customresourcedefinitions", None, "widgets.example.com")
        with pytest.raises(ApiError) as err:
            call(srv.url, "request", "GET", "/apis/example.com/v1/namespaces/default/widgets")
        assert err.value.status == 404


def test_peerings_and_leases(server):
    cluster = call(server.url, "create", "kopf.dev/v1", "clusterkopfpeerings", None,
                   {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "op"}})
    assert "namespace" not in cluster["metadata"]
    lease = call(server.url, "create", "coordination.k8s.io/v1", "leases", "default",
                 {"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}})
    lease["spec"]["holderIdentity"] = "b"
    assert call(server.url, "replace", "coordination.k8s.io/v1", "leases", "default", "leader", lease)["spec"][
        "holderIdentity"] == "b"
    assert crd("merges")["spec"]["group"] == "branchmerge.dev"
