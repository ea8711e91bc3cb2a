"""The API-server stand-in's write pipeline, over real HTTP with the committed CRDs: decode → prune →
default → validate (OpenAPI + CEL) → store, server-owned metadata, generateName, /status, resourceVersion
preconditions, no-op writes, built-in kinds' rules."""
from __future__ import annotations

import copy
import json

import pytest
from .apiserver_helpers import MERGES, call, configmap, crd, example, raw

from testcluster import ApiError, ApiServer


@pytest.fixture(scope="module")
def server():
    with ApiServer(gc="off", seed=7) as srv:
        yield srv


def merge_doc(name: str = "m1") -> dict:
    doc = copy.deepcopy(example("02-merge-methods/ties.yaml")[0])
    doc["metadata"]["name"] = name
    return doc


def _schema_defaults(node: dict, value: dict, path: str = "") -> list[tuple[str, object]]:
    """Independent reading of the CRD: which (path, default) a server must fill into ``value``."""
    out = []
    for key, child in (node.get("properties") or {}).items():
        if key not in value and "default" in child:
            out.append((f"{path}.{key}", child["default"]))
            sub = copy.deepcopy(child["default"])
        else:
            sub = value.get(key)
        if isinstance(sub, dict) and child.get("type") == "object":
            out += _schema_defaults(child, sub, f"{path}.{key}")
        elif isinstance(sub, list) and isinstance(child.get("items"), dict):
            for i, item in enumerate(sub):
                if isinstance(item, dict):
                    out += _schema_defaults(child["items"], item, f"{path}.{key}[{i}]")
    return out


def _subset(small, big) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _subset(v, big[k]) for k, v in small.items())
    return small == big


def _at(obj, path: str):
    for part in path.strip(".").replace("]", "").split("."):
        name, _, index = part.partition("[")
        obj = obj[name]
        if index:
            obj = obj[int(index)]
    return obj


# ---- decode ------------------------------------------------------------------------------------------------

def test_malformed_json_is_400_with_a_status(server):
    status, body, _ = raw(server.url, "POST", "/api/v1/namespaces/default/configmaps", b'{"metadata": {')
    assert status == 400
    assert body["kind"] == "Status" and body["status"] == "Failure" and body["reason"] == "BadRequest"
    assert body["code"] == 400


@pytest.mark.parametrize("token,name", [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "minus-inf")])
def test_non_finite_numbers_in_a_status_patch_are_400(server, token, name):
    call(server.url, "create", MERGES, "merges", "default", merge_doc(name))
    body = ('{"status": {"progress": {"fraction": %s}}}' % token).encode()
    status, doc, _ = raw(server.url, "PATCH", f"/apis/{MERGES}/namespaces/default/merges/{name}/status", body,
                         "application/merge-patch+json")
    assert status == 400 and doc["reason"] == "BadRequest", doc
    stored = call(server.url, "get", MERGES, "merges", "default", name)
    assert "progress" not in (stored.get("status") or {})


# ---- prune + default ---------------------------------------------------------------------------------------

def test_unknown_fields_are_pruned_with_a_warning(server):
    doc = merge_doc("pruned")
    doc["spec"]["notAField"] = 1
    doc["spec"]["models"][0]["alsoUnknown"] = "x"
    doc["metadata"]["notMeta"] = True
    status, body, headers = raw(server.url, "POST", f"/apis/{MERGES}/namespaces/default/merges",
                                json.dumps(doc).encode())
    assert status == 201, body
    assert "notAField" not in body["spec"] and "alsoUnknown" not in body["spec"]["models"][0]
    assert "notMeta" not in body["metadata"]
    assert 'unknown field \\"spec.notAField\\"' in headers.get("Warning", "") or \
        'unknown field "spec.notAField"' in headers.get("Warning", "")
    strict = merge_doc("strict")
    strict["spec"]["notAField"] = 1
    status, body, _ = raw(server.url, "POST", f"/apis/{MERGES}/namespaces/default/merges?fieldValidation=Strict",
                          json.dumps(strict).encode())
    assert status == 400 and "spec.notAField" in body["message"]


def test_preserve_unknown_fields_keeps_status_of_kopf_peerings(server):
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "p"},
               "status": {"any": {"thing": [1, 2]}}, "junk": 1}
    created = call(server.url, "create", "kopf.dev/v1", "kopfpeerings", "default", peering)
    assert created["status"] == {"any": {"thing": [1, 2]}}  # no status subresource: kept on create
    assert "junk" not in created


def test_merge_from_the_examples_gets_the_crd_defaults(server):
    doc = example("quickstart/03-merges.yaml")[0]
    created = call(server.url, "create", MERGES, "merges", "default", doc)
    schema = crd("merges")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    expected = _schema_defaults(schema, doc["spec"], "spec")
    assert len(expected) >= 5
    for path, value in expected:  # a defaulted object is itself defaulted: the default is a subset
        assert _subset(value, _at(created, path)), path
    # What the committed CRD defaults today (the stage must accept every stored form).
    spec = created["spec"]
    assert spec["dtype"] == "float32" and spec["outShardSize"] == "5GB" and spec["seed"] == 0
    assert spec["parameters"]["overrides"] == [] and spec["resources"]["nodes"] == 1
    weight = schema["properties"]["models"]["items"]["properties"].get("weight", {})
    if "default" in weight:
        assert all(m["weight"] == weight["default"] for m in spec["models"])
    # And a read returns the same defaulted object.
    assert call(server.url, "get", MERGES, "merges", "default", doc["metadata"]["name"])["spec"] == spec


def test_a_default_added_by_a_crd_upgrade_appears_on_read_without_a_generation_bump():
    new_crd = crd("merges")
    old_crd = copy.deepcopy(new_crd)
    del old_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["seed"][
        "default"]
    with ApiServer(gc="off") as srv:
        srv.install_crd(old_crd)
        created = call(srv.url, "create", MERGES, "merges", "default", merge_doc("old"))
        assert "seed" not in created["spec"]
        srv.install_crd(new_crd)
        read = call(srv.url, "get", MERGES, "merges", "default", "old")
        assert read["spec"]["seed"] == 0
        assert read["metadata"]["generation"] == 1
        assert read["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
        assert "seed" not in srv.stored(MERGES, "merges", "default", "old")["spec"]  # storage keeps the old form
        items, _ = call(srv.url, "list", MERGES, "merges", "default")
        assert items[0]["spec"]["seed"] == 0
        # A label change is a write: the stored form gains the default, still no generation bump.
        patched = call(srv.url, "patch", MERGES, "merges", "default", "old", {"metadata": {"labels": {"a": "b"}}})
        assert patched["metadata"]["generation"] == 1
        assert srv.stored(MERGES, "merges", "default", "old")["spec"]["seed"] == 0


# ---- validation --------------------------------------------------------------------------------------------

def _invalid(server, doc, plural="merges", gv=MERGES) -> dict:
    with pytest.raises(ApiError) as err:
        call(server.url, "create", gv, plural, "default", doc)
    assert err.value.status == 422 and err.value.reason == "Invalid", err.value
    return err.value.body


def test_openapi_validation_reports_every_field_with_its_path(server):
    doc = merge_doc("bad")
    doc["spec"]["method"] = "average"
    doc["spec"]["models"][1]["weight"] = "heavy"
    doc["spec"]["parameters"]["lambda"] = 1000
    body = _invalid(server, doc)
    causes = {c["field"]: c for c in body["details"]["causes"]}
    assert causes["spec.method"]["reason"] == "FieldValueNotSupported"
    assert causes["spec.models[1].weight"]["reason"] == "FieldValueTypeInvalid"
    assert causes["spec.parameters.lambda"]["reason"] == "FieldValueInvalid"
    assert "less than or equal to 100" in causes["spec.parameters.lambda"]["message"]
    assert body["message"].startswith('Merge.branchmerge.dev "bad" is invalid: [')
    assert body["details"]["kind"] == "Merge" and body["details"]["group"] == "branchmerge.dev"


def test_required_and_pattern(server):
    doc = merge_doc("bad2")
    del doc["spec"]["models"]
    doc["spec"]["base"] = {"uri": "ftp://nope"}
    causes = {c["field"]: c for c in _invalid(server, doc)["details"]["causes"]}
    assert causes["spec.models"]["reason"] == "FieldValueRequired"
    assert "should match" in causes["spec.base.uri"]["message"]


def test_cel_rules_report_message_reason_and_field_path(server):
    doc = merge_doc("celbad")
    doc["spec"]["method"] = "slerp"  # slerp needs parameters.t and its base among the models
    body = _invalid(server, doc)
    causes = {c["field"]: c for c in body["details"]["causes"]}
    assert causes["spec.models"]["message"].endswith("slerp needs exactly 2 models and parameters.t")
    assert causes["spec.base"]["reason"] == "FieldValueInvalid"
    ref = merge_doc("celref")
    ref["spec"]["models"][0] = {"uri": "pvc://models/a", "from": {"kind": "BranchSFT", "name": "x"}}
    causes = {c["field"]: c for c in _invalid(server, ref)["details"]["causes"]}
    assert causes["spec.models[0]"]["message"].endswith("exactly one of uri or from must be set")


def test_cel_is_skipped_when_a_blocking_schema_error_exists(server):
    doc = merge_doc("blocked")
    doc["spec"]["method"] = "slerp"
    doc["spec"]["models"] = "not-a-list"
    causes = _invalid(server, doc)["details"]["causes"]
    assert any("some validation rules were not checked" in c["message"] for c in causes)
    assert not any("slerp needs" in c["message"] for c in causes)


def test_transition_rules_use_old_self_only_on_update():
    doc = crd("merges")
    spec = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["method"]["x-kubernetes-validations"] = [
        {"rule": "self == oldSelf", "message": "method is immutable", "reason": "FieldValueForbidden"}]
    spec["properties"]["seed"]["x-kubernetes-validations"] = [
        {"rule": "self >= 0", "messageExpression": "'seed ' + string(self) + ' is negative'"}]
    with ApiServer(gc="off") as srv:
        srv.install_crd(doc)
        created = call(srv.url, "create", MERGES, "merges", "default", merge_doc("t"))  # no oldSelf: passes
        with pytest.raises(ApiError) as err:
            call(srv.url, "patch", MERGES, "merges", "default", "t", {"spec": {"method": "linear"}})
        assert err.value.status == 422
        cause = err.value.body["details"]["causes"][0]
        assert cause == {"reason": "FieldValueForbidden", "message": "Forbidden: method is immutable",
                         "field": "spec.method"}
        with pytest.raises(ApiError) as err:
            call(srv.url, "patch", MERGES, "merges", "default", "t", {"spec": {"seed": -3}})
        assert "seed -3 is negative" in err.value.message
        ok = call(srv.url, "patch", MERGES, "merges", "default", "t", {"spec": {"seed": 4}})
        assert ok["metadata"]["generation"] == created["metadata"]["generation"] + 1


def test_metadata_validation(server):
    bad = configmap("Not_A_Name")
    with pytest.raises(ApiError) as err:
        call(server.url, "create", "v1", "configmaps", "default", bad)
    assert err.value.status == 422 and err.value.body["details"]["causes"][0]["field"] == "metadata.name"
    with pytest.raises(ApiError) as err:
        call(server.url, "create", "v1", "configmaps", "default", configmap("ok", labels={"bad key!": "v"}))
    assert err.value.body["details"]["causes"][0]["field"] == "metadata.labels"
    with pytest.raises(ApiError) as err:
        call(server.url, "create", "v1", "services", "default",
             {"metadata": {"name": "1svc"}, "spec": {"ports": [{"port": 80}]}})
    assert "DNS-1035" in err.value.message
    with pytest.raises(ApiError) as err:
        call(server.url, "create", "v1", "configmaps", "default", {"metadata": {}, "data": {}})
    assert "name or generateName is required" in err.value.message


def test_missing_namespace_is_404_and_mismatched_namespace_is_400(server):
    with pytest.raises(ApiError) as err:
        call(server.url, "create", "v1", "configmaps", "nowhere", configmap("x"))
    assert err.value.status == 404 and err.value.message == 'namespaces "nowhere" not found'
    with pytest.raises(ApiError) as err:
        call(server.url, "create", "v1", "configmaps", "default", configmap("x", namespace="other"))
    assert err.value.status == 400


# ---- store -------------------------------------------------------------------------------------------------

def test_server_owned_metadata(server):
    doc = configmap("owned", uid="client-uid", creationTimestamp="2000-01-01T00:00:00Z", generation=9)
    created = call(server.url, "create", "v1", "configmaps", "default", doc)
    meta = created["metadata"]
    assert meta["uid"] != "client-uid" and meta["creationTimestamp"] != "2000-01-01T00:00:00Z"
    assert "generation" not in meta  # only kinds with a spec generation track it
    assert int(meta["resourceVersion"]) > 0
    updated = call(server.url, "patch", "v1", "configmaps", "default", "owned",
                   {"metadata": {"creationTimestamp": "2001-01-01T00:00:00Z"}, "data": {"k": "w"}})
    assert updated["metadata"]["creationTimestamp"] == meta["creationTimestamp"]
    with pytest.raises(ApiError) as err:
        call(server.url, "patch", "v1", "configmaps", "default", "owned", {"metadata": {"uid": "other"}})
    assert err.value.status == 422 and "immutable" in err.value.message
    with pytest.raises(ApiError) as err:
        call(server.url, "create", "v1", "configmaps", "default", configmap("rv", resourceVersion="5"))
    assert "resourceVersion should not be set" in err.value.message


def test_generate_name_appends_five_characters_and_retries_collisions(server):
    names = set()
    for _ in range(30):
        obj = call(server.url, "create", "v1", "configmaps", "default",
                   {"metadata": {"generateName": "gen-"}, "data": {}})
        name = obj["metadata"]["name"]
        assert name.startswith("gen-") and len(name) == 9
        assert all(c in "bcdfghjklmnpqrstvwxz2456789" for c in name[4:])
        names.add(name)
    assert len(names) == 30
    long = call(server.url, "create", "v1", "configmaps", "default", {"metadata": {"generateName": "x" * 70}})
    assert len(long["metadata"]["name"]) == 63
    # Same seed → same first candidate: occupy it, the server must retry and still succeed.
    with ApiServer(gc="off", seed=1) as a, ApiServer(gc="off", seed=1) as b:
        first = call(a.url, "create", "v1", "configmaps", "default", {"metadata": {"generateName": "c-"}})
        call(b.url, "create", "v1", "configmaps", "default", configmap(first["metadata"]["name"]))
        second = call(b.url, "create", "v1", "configmaps", "default", {"metadata": {"generateName": "c-"}})
        assert second["metadata"]["name"] != first["metadata"]["name"]


def test_generation_moves_on_spec_changes_only(server):
    call(server.url, "create", MERGES, "merges", "default", merge_doc("gen"))
    labelled = call(server.url, "patch", MERGES, "merges", "default", "gen", {"metadata": {"labels": {"x": "y"}}})
    assert labelled["metadata"]["generation"] == 1
    status = call(server.url, "patch", MERGES, "merges", "default", "gen", {"status": {"phase": "Running"}},
                  sub="status")
    assert status["metadata"]["generation"] == 1 and status["status"]["phase"] == "Running"
    spec = call(server.url, "patch", MERGES, "merges", "default", "gen", {"spec": {"seed": 5}})
    assert spec["metadata"]["generation"] == 2


def test_status_subresource_separates_status_from_the_rest(server):
    created = call(server.url, "create", MERGES, "merges", "default", {**merge_doc("st"), "status": {"phase": "X"}})
    assert "status" not in created or created["status"].get("phase") != "X"  # create cannot set status
    main = call(server.url, "patch", MERGES, "merges", "default", "st", {"status": {"phase": "Running"}})
    assert (main.get("status") or {}).get("phase") != "Running"  # the main resource ignores status
    sub = call(server.url, "patch", MERGES, "merges", "default", "st",
               {"status": {"phase": "Running"}, "spec": {"seed": 99}, "metadata": {"labels": {"l": "v"}}}, sub="status")
    assert sub["status"]["phase"] == "Running"
    assert sub["spec"]["seed"] != 99 and "l" not in (sub["metadata"].get("labels") or {})
    # Pods: /status may change labels (podStatusStrategy), never the spec.
    call(server.url, "create", "v1", "pods", "default",
         {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "img:1"}]}})
    pod = call(server.url, "patch", "v1", "pods", "default", "p",
               {"status": {"phase": "Running"}, "metadata": {"labels": {"l": "v"}}, "spec": {"nodeName": "n"}},
               sub="status")
    assert pod["status"]["phase"] == "Running" and pod["metadata"]["labels"] == {"l": "v"}
    assert "nodeName" not in pod["spec"]


def test_stale_put_is_409_and_cr_put_needs_a_resource_version(server):
    created = call(server.url, "create", MERGES, "merges", "default", merge_doc("put"))
    fresh = copy.deepcopy(created)
    fresh["spec"]["seed"] = 1
    updated = call(server.url, "replace", MERGES, "merges", "default", "put", fresh)
    assert updated["metadata"]["generation"] == 2
    stale = copy.deepcopy(created)
    stale["spec"]["seed"] = 2
    with pytest.raises(ApiError) as err:
        call(server.url, "replace", MERGES, "merges", "default", "put", stale)
    assert err.value.status == 409 and err.value.reason == "Conflict"
    assert "the object has been modified" in err.value.message
    del stale["metadata"]["resourceVersion"]
    with pytest.raises(ApiError) as err:
        call(server.url, "replace", MERGES, "merges", "default", "put", stale)
    assert err.value.status == 422 and "must be specified for an update" in err.value.message
    # Built-ins allow an unconditional PUT.
    cm = call(server.url, "create", "v1", "configmaps", "default", configmap("put"))
    cm["data"] = {"k": "new"}
    del cm["metadata"]["resourceVersion"]
    assert call(server.url, "replace", "v1", "configmaps", "default", "put", cm)["data"] == {"k": "new"}


def test_patch_resource_version_and_json_patch_test(server):
    cm = call(server.url, "create", "v1", "configmaps", "default", configmap("patchy"))
    rv = cm["metadata"]["resourceVersion"]
    call(server.url, "patch", "v1", "configmaps", "default", "patchy", {"data": {"k": "2"}})
    with pytest.raises(ApiError) as err:  # a stale resourceVersion in a merge patch
        call(server.url, "patch", "v1", "configmaps", "default", "patchy",
             {"metadata": {"resourceVersion": rv}, "data": {"k": "3"}})
    assert err.value.status == 409
    with pytest.raises(ApiError) as err:  # a failed test op: 422
        call(server.url, "patch", "v1", "configmaps", "default", "patchy",
             [{"op": "test", "path": "/data/k", "value": "nope"}, {"op": "replace", "path": "/data/k", "value": "x"}],
             patch_type="json")
    assert err.value.status == 422
    done = call(server.url, "patch", "v1", "configmaps", "default", "patchy",
                [{"op": "test", "path": "/data/k", "value": "2"}, {"op": "add", "path": "/data/j", "value": "y"}],
                patch_type="json")
    assert done["data"] == {"k": "2", "j": "y"}


def test_no_op_writes_keep_the_resource_version(server):
    cm = call(server.url, "create", "v1", "configmaps", "default", configmap("noop"))
    same = call(server.url, "patch", "v1", "configmaps", "default", "noop", {"data": {"k": "v"}})
    assert same["metadata"]["resourceVersion"] == cm["metadata"]["resourceVersion"]
    again = call(server.url, "replace", "v1", "configmaps", "default", "noop", cm)
    assert again["metadata"]["resourceVersion"] == cm["metadata"]["resourceVersion"]


# ---- built-in kinds ----------------------------------------------------------------------------------------

def _job(name: str, **spec) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"template": {"metadata": {"labels": {"app": "x"}},
                                  "spec": {"restartPolicy": "Never",
                                           "containers": [{"name": "c", "image": "ghcr.io/x/y:1"}]}}, **spec}}


def test_job_defaults_selector_and_labels(server):
    job = call(server.url, "create", "batch/v1", "jobs", "default", _job("j1"))
    spec, uid = job["spec"], job["metadata"]["uid"]
    assert (spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (1, 1, 6)
    assert spec["completionMode"] == "NonIndexed" and spec["suspend"] is False
    assert spec["podReplacementPolicy"] == "TerminatingOrFailed"
    assert spec["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    assert spec["template"]["metadata"]["labels"] == {
        "app": "x", "batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
        "batch.kubernetes.io/job-name": "j1", "job-name": "j1"}
    assert job["metadata"]["labels"] == {"app": "x"} and job["metadata"]["generation"] == 1
    pod_spec = spec["template"]["spec"]
    assert pod_spec["terminationGracePeriodSeconds"] == 30 and pod_spec["dnsPolicy"] == "ClusterFirst"
    assert pod_spec["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    parallel = call(server.url, "create", "batch/v1", "jobs", "default", _job("j2", parallelism=3))
    assert "completions" not in parallel["spec"] and parallel["spec"]["parallelism"] == 3


def test_job_validation_and_immutability(server):
    bad = _job("j3")
    del bad["spec"]["template"]["spec"]["restartPolicy"]
    with pytest.raises(ApiError) as err:
        call(server.url, "create", "batch/v1", "jobs", "default", bad)
    assert err.value.status == 422 and "spec.template.spec.restartPolicy" in err.value.message
    with pytest.raises(ApiError):
        call(server.url, "create", "batch/v1", "jobs", "default", _job("j" * 64))
    call(server.url, "create", "batch/v1", "jobs", "default", _job("j4"))
    with pytest.raises(ApiError) as err:
        call(server.url, "patch", "batch/v1", "jobs", "default", "j4",
             {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "other:2"}]}}}})
    assert err.value.status == 422 and "spec.template" in err.value.message
    with pytest.raises(ApiError):
        call(server.url, "patch", "batch/v1", "jobs", "default", "j4", {"spec": {"completions": 3}})
    suspended = call(server.url, "patch", "batch/v1", "jobs", "default", "j4", {"spec": {"suspend": True}})
    assert suspended["metadata"]["generation"] == 2
    call(server.url, "create", "batch/v1", "jobs", "default", _job("j5", suspend=True))
    moved = call(server.url, "patch", "batch/v1", "jobs", "default", "j5",
                 {"spec": {"template": {"spec": {"nodeSelector": {"pool": "a"}}}}})
    assert moved["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "a"}


def test_configmap_immutable(server):
    call(server.url, "create", "v1", "configmaps", "default", {**configmap("frozen"), "immutable": True})
    with pytest.raises(ApiError) as err:
        call(server.url, "patch", "v1", "configmaps", "default", "frozen", {"data": {"k": "changed"}})
    assert err.value.status == 422 and "immutable" in err.value.message
    with pytest.raises(ApiError):
        call(server.url, "patch", "v1", "configmaps", "default", "frozen", {"immutable": False})
    labels = call(server.url, "patch", "v1", "configmaps", "default", "frozen", {"metadata": {"labels": {"a": "b"}}})
    assert labels["metadata"]["labels"] == {"a": "b"}


def test_service_cluster_ip_pvc_binding_and_secret_string_data(server):
    headless = call(server.url, "create", "v1", "services", "default",
                    {"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 29500}]}})
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["ports"][0]["targetPort"] == 29500
    normal = call(server.url, "create", "v1", "services", "default",
                  {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})
    assert normal["spec"]["clusterIP"].startswith("10.96.") and normal["spec"]["clusterIPs"] == [
        normal["spec"]["clusterIP"]]
    call(server.url, "create", "v1", "persistentvolumeclaims", "default",
         {"metadata": {"name": "models"}, "spec": {"accessModes": ["ReadWriteMany"],
                                                   "resources": {"requests": {"storage": "10Gi"}}}})
    from testcluster.wait import wait_for
    claim = wait_for(lambda: (lambda c: c if (c.get("status") or {}).get("phase") == "Bound" else None)(
        call(server.url, "get", "v1", "persistentvolumeclaims", "default", "models")))
    assert claim["status"]["capacity"] == {"storage": "10Gi"}
    secret = call(server.url, "create", "v1", "secrets", "default",
                  {"metadata": {"name": "tok"}, "stringData": {"token": "abc"}})
    assert secret["data"] == {"token": "YWJj"} and secret["type"] == "Opaque" and "stringData" not in secret


def test_events_in_both_api_groups_share_one_storage(server):
    core = call(server.url, "create", "v1", "events", "default", {
        "metadata": {"name": "e1"}, "involvedObject": {"kind": "Merge", "name": "m", "namespace": "default"},
        "reason": "Started", "message": "hello", "type": "Normal"})
    assert core["involvedObject"]["name"] == "m"
    new = call(server.url, "get", "events.k8s.io/v1", "events", "default", "e1")
    assert new["regarding"]["name"] == "m" and new["note"] == "hello" and new["apiVersion"] == "events.k8s.io/v1"
    items, _ = call(server.url, "list", "v1", "events", "default", field_selector="involvedObject.name=m")
    assert [e["metadata"]["name"] for e in items] == ["e1"]


def test_discovery_documents(server):
    status, api, _ = raw(server.url, "GET", "/api")
    assert api["versions"] == ["v1"]
    _, v1, _ = raw(server.url, "GET", "/api/v1")
    assert v1["groupVersion"] == "v1"
    names = {r["name"] for r in v1["resources"]}
    assert {"pods", "pods/status", "pods/binding", "pods/log", "configmaps", "namespaces", "nodes"} <= names
    _, group, _ = raw(server.url, "GET", f"/apis/{MERGES}")
    merges = next(r for r in group["resources"] if r["name"] == "merges")
    assert merges["kind"] == "Merge" and merges["namespaced"] and "bmerge" in merges["shortNames"]
    assert "merges/status" in {r["name"] for r in group["resources"]}
    _, groups, _ = raw(server.url, "GET", "/apis")
    assert {"batch", "branchmerge.dev", "kopf.dev", "coordination.k8s.io"} <= {g["name"] for g in groups["groups"]}
    _, crds, _ = raw(server.url, "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
    assert "merges.branchmerge.dev" in {c["metadata"]["name"] for c in crds["items"]}
