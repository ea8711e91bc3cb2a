"""A NaN metric must not wedge a CR: the status the operator derives from a stage's termination message
holding NaN/Infinity (what a stage of an older release writes for a diverged loss) is accepted by the
API-server stand-in, which, like kube-apiserver, answers 400 to any body holding a non-finite number."""
from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from branchmerge.operator.emulator import Api
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import Observed, plan
from testcluster.apiserver import ApiServer

REPO = Path(__file__).resolve().parents[2]
MESSAGE = ('{"phase":"Succeeded","outputUri":"pvc://models/m","digest":"sha256:abc",'
           '"metrics":{"finalLoss":NaN,"gradNorm":Infinity,"tensorsMerged":5}}')


def _patch_status(api: Api, name: str, body: str) -> int:
    req = urllib.request.Request(f"{api.server}/apis/branchmerge.dev/v1alpha1/namespaces/ns/merges/{name}/status",
                                 data=body.encode(), method="PATCH",
                                 headers={"Content-Type": "application/merge-patch+json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture()
def api():
    with ApiServer(REPO / "crds") as server:
        api = Api(server.url)
        api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}})
        yield api


def test_a_nan_metric_from_a_stage_is_written_to_status_as_the_server_accepts(api):
    cr = api.create({"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge", "metadata": {"name": "m"},
                     "spec": {"method": "linear", "models": [{"uri": "pvc://models/a"}, {"uri": "pvc://models/b"}],
                              "output": {"uri": "pvc://models/m"}}}, "ns")
    first = plan(copy.deepcopy(cr), {}, Observed(), OperatorOptions(), 0.0)
    job = next(c for c in first.create if c["kind"] == "Job")
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1,
                     "completionTime": "2026-01-01T00:00:00Z"}
    pod = {"metadata": {"name": "p", "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
           "status": {"phase": "Succeeded", "containerStatuses": [
               {"name": "stage", "state": {"terminated": {"exitCode": 0, "message": MESSAGE}}}]}}
    cr["status"] = first.status
    done = plan(cr, {}, Observed(jobs=[job], pods={job["metadata"]["name"]: [pod]}), OperatorOptions(), 1.0)
    assert done.status["phase"] == "Succeeded" and done.status["metrics"]["tensorsMerged"] == 5
    # what the operator's client sends (json.dumps) is what the server takes
    assert _patch_status(api, "m", json.dumps({"status": done.status})) == 200
    assert api.get("Merge", "ns", "m")["status"]["phase"] == "Succeeded"
    # and the server is the strict one: the old behaviour (NaN copied into status) is refused
    assert _patch_status(api, "m", '{"status": {"metrics": {"finalLoss": NaN}}}') == 400
