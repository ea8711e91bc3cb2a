"""Least privilege: the RBAC manifests grant exactly what the operator uses, and every request the
operator and kopf make while running a pipeline (recorded by the emulator) is allowed by them."""
from __future__ import annotations

from pathlib import Path

import yaml

from branchmerge.operator.emulator import Api, EmulatorThread, OperatorThread
from branchmerge.operator.options import OperatorOptions

from testcluster.wait import wait_for

from .emulator_driver import finish, jobs_of, manifest, phase, result
from .kube_objects import NS, pipeline

RBAC = Path(__file__).resolve().parents[2] / "deploy" / "rbac"
TOKEN_REVIEW = ("authentication.k8s.io", "tokenreviews", "create")


def rules(filename: str, kind: str) -> set[tuple[str, str, str]]:
    """(group, resource, verb) granted by the Role/ClusterRole in ``filename``."""
    granted = set()
    assert (RBAC / filename).exists(), f"deploy/rbac/{filename} does not exist"
    for doc in yaml.safe_load_all((RBAC / filename).read_text()):
        if doc and doc["kind"] == kind:
            for rule in doc["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
                granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return granted


def test_namespaced_and_clusterwide_grant_the_same_namespaced_rights():
    cluster = rules("operator-clusterwide.yaml", "ClusterRole")
    namespaced = rules("operator-namespaced.yaml", "Role")
    namespaced_cluster = rules("operator-namespaced.yaml", "ClusterRole")
    swap = {"clusterkopfpeerings": "kopfpeerings"}
    assert {(g, swap.get(r, r), v) for g, r, v in cluster} == namespaced | namespaced_cluster
    # TokenReview is cluster-scoped: even the namespaced install grants it (and only it) with a ClusterRole
    assert namespaced_cluster == {TOKEN_REVIEW}


def test_operator_may_authenticate_progress_reports():
    """Live progress: the operator checks each report's token (TokenReview) and reads the reporting pod to walk
    its owners (get pods). Stage pods get no API token, so nothing in deploy/rbac/ is for them."""
    for filename, kind in (("operator-clusterwide.yaml", "ClusterRole"), ("operator-namespaced.yaml", "Role")):
        granted = rules(filename, kind) | rules(filename, "ClusterRole")
        assert TOKEN_REVIEW in granted and ("", "pods", "get") in granted, filename
    assert sorted(p.name for p in RBAC.glob("*.yaml")) == ["operator-clusterwide.yaml", "operator-namespaced.yaml"]
    for path in RBAC.glob("*.yaml"):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"] == ["branchmerge-operator"]
        for binding in (d for d in docs if d["kind"].endswith("Binding")):
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "branchmerge-operator",
                                            "namespace": "branchmerge-system"}], path.name


def test_every_request_of_a_pipeline_run_is_allowed():
    granted = rules("operator-namespaced.yaml", "Role")
    with EmulatorThread() as emu:
        api = Api(emu.url)
        with OperatorThread(emu.url, OperatorOptions(), namespaces=[NS]):
            docs = pipeline()
            docs[1]["spec"]["runPolicy"] = {"backoffSeconds": 0}
            for doc in docs:
                api.create(manifest(doc), NS)
            for name, kind in (("gen", "TeacherGen"), ("sft", "BranchSFT"), ("merge", "Merge"), ("eval", "Eval")):
                job = wait_for(lambda: jobs_of(api, name), what=f"{name}'s Job")[0]
                if name == "sft":  # a retry lists pods and creates a second attempt
                    finish(api, job, False, exit_code=3)
                    job = wait_for(lambda: len(jobs_of(api, name)) == 2 and jobs_of(api, name), timeout=60)[1]
                if name == "merge":  # suspend + spec edit: Job patch and delete
                    api.patch(kind, NS, name, {"spec": {"resources": {"suspend": True}}})
                    wait_for(lambda: phase(api, kind, name) == "Suspended")
                    api.patch(kind, NS, name, {"spec": {"resources": {"suspend": False}}})
                    api.patch(kind, NS, name, {"spec": {"seed": 7}})
                    wait_for(lambda: api.get("Job", NS, job["metadata"]["name"]) is None)
                    job = wait_for(lambda: jobs_of(api, name))[0]
                finish(api, job, True, message=result(f"pvc://out/{name}"))
                wait_for(lambda: phase(api, kind, name) == "Succeeded", what=f"{name} Succeeded")
        used = {(group, res, verb) for client, verb, group, res in emu.emulator.audit
                if client in ("kopf", "branchmerge-operator")}
    assert ("batch", "jobs", "create") in used and ("", "pods", "list") in used
    assert ("batch", "jobs", "delete") in used and ("batch", "jobs", "patch") in used
    denied = used - granted
    assert not denied, f"requests the Role does not allow: {sorted(denied)}"
