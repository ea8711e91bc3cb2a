"""MergeSearch through the operator (kopf against the kmock emulator): the search creates its trials as owned
Merge and Eval CRs, the operator runs those like any other (their Jobs are driven here as a kubelet would), a
permanently failing trial is recorded and the search goes on, the winner becomes the search's output and a
downstream Eval runs on it; an Eval scoring the winner on the search's own data gets a warning."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
from testcluster.apiserver import ApiServer
from testcluster.wait import wait_for

from branchmerge.operator.emulator import Api, EmulatorThread, OperatorThread
from branchmerge.operator.options import OperatorOptions
from branchmerge.api.labels import LABEL_SEARCH
from branchmerge.operator.searchplan import SELECTION_ON_TEST

from tests.conftest import API_VERSION as API
from .emulator_driver import jobs_of, phase, result
from .kube_objects import NS, pod
from .test_operator_rbac import rules

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]
DEV = {"name": "math-dev", "kind": "math", "dataset": {"uri": "pvc://data/math-dev.jsonl"}}
SEARCH = {
    "apiVersion": API, "kind": "MergeSearch", "metadata": {"name": "pick"},
    "spec": {"base": {"uri": "pvc://models/base"},
             "branches": [{"name": "math", "model": {"uri": "pvc://models/math"}},
                          {"name": "code", "model": {"uri": "pvc://models/code"}}],
             "space": [{"method": "linear", "weights": {"math": {"values": [0.5, 1.0]}}},
                       {"method": "ties", "parameters": {"density": {"values": [0.5]}}}],
             "budget": {"maxTrials": 3, "parallelism": 2}, "sampler": {"name": "grid"},
             "eval": {"benchmarks": [DEV]}},
}
FINAL = {"apiVersion": API, "kind": "Eval", "metadata": {"name": "final"},
         "spec": {"model": {"from": {"kind": "MergeSearch", "name": "pick"}}, "benchmarks": [DEV]}}


@pytest.fixture(params=["emulator", "apiserver"])
def cluster(request):
    """kopf against kmock's emulator, and against the faithful API-server stand-in loaded from the committed
    CRDs (prune, CRD defaults, schema and CEL on every child the search creates, garbage collection)."""
    with contextlib.ExitStack() as stack:
        audit = None
        if request.param == "emulator":
            emu = stack.enter_context(EmulatorThread())
            url, audit = emu.url, emu.emulator.audit
        else:
            url = stack.enter_context(ApiServer(REPO / "crds", gc_delay=0.05, gc_interval=0.3)).url
            Api(url).call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                         "metadata": {"name": NS}})
        api = Api(url)
        op = stack.enter_context(OperatorThread(url, OperatorOptions(default_output_root="pvc://out"),
                                                namespaces=[NS]))
        yield api, audit


def _children(api: Api) -> list[dict]:
    return [o for kind in ("Merge", "Eval") for o in api.list(kind, NS)
            if (o["metadata"].get("labels") or {}).get(LABEL_SEARCH) == "pick"]


def finish(api: Api, job: dict, ok: bool, *, exit_code: int = 1, message: str = "") -> None:
    """Play the kubelet and the Job controller with objects a real API server accepts: the pod (a valid
    spec; its termination state written through /status), then the Job's final condition."""
    name = job["metadata"]["name"]
    doc = pod(name, exit_code=0 if ok else exit_code, message=message)
    status = doc.pop("status")
    doc["spec"] = {"restartPolicy": "Never", "containers": [{"name": "stage", "image": "stage"}]}
    api.create(doc, NS)
    api.patch("Pod", NS, doc["metadata"]["name"], {"status": status}, sub="status")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    job_status = {"conditions": [{"type": "Complete" if ok else "Failed", "status": "True", "lastTransitionTime": now,
                                  "reason": "Completed" if ok else "BackoffLimitExceeded", "message": ""}],
                  "succeeded" if ok else "failed": 1, "startTime": now}
    if ok:
        job_status["completionTime"] = now
    api.patch("Job", NS, name, {"status": job_status}, sub="status")


def _drive(api: Api, done: set[str]) -> None:
    """Finish every child Job that exists: ties Merges fail for good (exit 2); an Eval scores its Merge by
    the toy rule pass@1 = 0.3 + 0.2 * weight(math)."""
    for child in _children(api):
        name, kind = child["metadata"]["name"], child["kind"]
        for job in jobs_of(api, name):
            if job["metadata"]["name"] in done:
                continue
            done.add(job["metadata"]["name"])
            if kind == "Merge" and child["spec"]["method"] == "ties":
                finish(api, job, False, exit_code=2, message='{"phase":"Failed","error":"spec: ties boom"}')
            elif kind == "Merge":
                finish(api, job, True, message=result(f"pvc://out/{name}"))
            else:
                merge = api.get("Merge", NS, child["spec"]["model"]["from"]["name"])
                weight = merge["spec"]["models"][0]["weight"]
                finish(api, job, True, message=result(f"pvc://out/{name}", score=0.3 + 0.2 * weight,
                                                      benchmarks={"math-dev": {"pass1": 0.3 + 0.2 * weight}}))


def test_search_runs_owned_children_and_publishes_the_winner(cluster):
    api, audit = cluster
    api.create(json.loads(json.dumps(SEARCH)), NS)
    api.create(json.loads(json.dumps(FINAL)), NS)
    search_uid = wait_for(lambda: api.get("MergeSearch", NS, "pick"))["metadata"]["uid"]
    done: set[str] = set()

    def finished() -> bool:
        _drive(api, done)
        return phase(api, "MergeSearch", "pick") in ("Succeeded", "Failed")

    wait_for(finished, timeout=150, what="the search to finish")
    search = api.get("MergeSearch", NS, "pick")
    status = search["status"]
    assert status["phase"] == "Succeeded", status
    children = _children(api)
    assert len(children) == 2 + 3  # 3 Merges; Evals only for the 2 that succeeded
    for child in children:
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("MergeSearch", search_uid, True)
    metrics = status["metrics"]
    assert (metrics["trialsDone"], metrics["trialsTotal"], metrics["trialsFailed"]) == (3, 3, 1)
    assert metrics["winner"]["params"] == {"weight.math": 1.0, "weight.code": 1.0} or \
        metrics["winner"]["params"] == {"weight.math": 1.0}
    assert metrics["winner"]["objective"] == pytest.approx(0.5)
    winner_merge = next(c for c in children if c["kind"] == "Merge" and c["spec"]["method"] == "linear"
                        and c["spec"]["models"][0]["weight"] == 1.0)
    assert status["output"] == winner_merge["status"]["output"]
    assert status["output"]["uri"].endswith(f"/merge/{winner_merge['metadata']['name']}")
    assert [r["rank"] for r in metrics["leaderboard"]] == [1, 2]

    # the downstream Eval runs on the winner, and the search warns: it is scored on the search's own data
    final_job = wait_for(lambda: jobs_of(api, "final"), what="final's Job")[0]
    cm = next(c for c in api.list("ConfigMap", NS) if c["metadata"]["labels"].get("branchmerge.dev/name") == "final")
    assert status["output"]["uri"] in cm["data"]["spec.yaml"]
    assert final_job
    warning = next(c for c in status["conditions"] if c["type"] == SELECTION_ON_TEST)
    assert warning["status"] == "True" and "Eval final" in warning["message"]
    events = [e for e in api.list("Event", NS) if e["involvedObject"]["name"] == "pick"]
    assert any(e["reason"] == SELECTION_ON_TEST and e["type"] == "Warning" for e in events)
    failed = [c for c in children if c["kind"] == "Merge" and c["spec"]["method"] == "ties"]
    assert phase(api, "Merge", failed[0]["metadata"]["name"]) == "Failed"

    # deleting the search garbage-collects its trials
    api.delete("MergeSearch", NS, "pick")
    wait_for(lambda: not _children(api), what="GC of the trials")
    if audit is not None:  # least privilege: every request of the search's reconciles is in deploy/rbac/
        used = {(group, res, verb) for client, verb, group, res in audit if client in ("kopf", "branchmerge-operator")}
        assert {("branchmerge.dev", "merges", "create"), ("branchmerge.dev", "evals", "create"),
                ("branchmerge.dev", "mergesearches/status", "patch")} <= used
        denied = used - rules("operator-namespaced.yaml", "Role")
        assert not denied, f"requests the Role does not allow: {sorted(denied)}"


def test_without_an_output_root_the_search_says_which_field_is_missing():
    with EmulatorThread() as emu:
        api = Api(emu.url)
        with OperatorThread(emu.url, OperatorOptions(), namespaces=[NS]):
            api.create(json.loads(json.dumps(SEARCH)), NS)
            wait_for(lambda: phase(api, "MergeSearch", "pick") == "Failed", what="the search to fail")
            ready = next(c for c in api.get("MergeSearch", NS, "pick")["status"]["conditions"] if c["type"] == "Ready")
            assert ready["reason"] == "InvalidSpec" and ready["message"].startswith("spec.outputRoot: required")
            assert not _children(api)
            rooted = json.loads(json.dumps(SEARCH))
            rooted["metadata"]["name"] = "rooted"
            rooted["spec"]["outputRoot"] = "pvc://claim/searches"
            api.create(rooted, NS)
            merges = wait_for(lambda: [m for m in api.list("Merge", NS)
                                       if m["metadata"]["labels"].get(LABEL_SEARCH) == "rooted"], what="children")
            assert merges[0]["spec"]["output"]["uri"].startswith("pvc://claim/searches/merge/rooted-m-")
