"""Live progress without status write access, through the operator on the stand-in cluster.

A stage pod reports to the operator's progress endpoint with its projected, pod-bound token (audience
branchmerge.dev/progress); the operator authenticates it with TokenReview, walks pod -> Job -> CR by uid
and writes the CR's status itself. Stage pods get no API token at all. A pod that is not a stage pod of a
CR (here: a rogue pod in the same namespace with a token of the right audience) is refused, and nothing
it sends reaches any status; neither does a report without a token or with a token for another audience.
"""
from __future__ import annotations

import json
import shutil
import socket
import time

from testcluster.cluster import TRAINER_CPU_IMAGE, Cluster

from .helpers import NEEDS_IMAGES, diagnose, on_claim, phases
from .test_multipod import _inputs, _teachergen

pytestmark = NEEDS_IMAGES

NS = "progress"
AUDIENCE = "branchmerge.dev/progress"

ROGUE = """
import json, urllib.request, urllib.error, sys
url = sys.argv[1]
def post(token):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    body = json.dumps({"fraction": 0.99, "message": "pwned", "metrics": {"score": 100},
                       "output": {"uri": "pvc://evil/x"}}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
bound = open("/var/run/secrets/branchmerge/token").read().strip()
api = open("/var/run/secrets/kubernetes.io/serviceaccount/token").read().strip()
print(json.dumps({"bound": post(bound), "none": post(None), "api_audience": post(api)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_pods_report_progress_only_through_the_operator(tmp_path):
    local = tmp_path / "local"
    _inputs(local)
    doc = _teachergen(local)
    doc["metadata"]["name"] = "reporting"
    doc["spec"]["resources"] = {}  # one worker: 64 prompts, a progress event after each batch
    prompts = local / "data" / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "question": f"what is {i} + {i}?"}) + "\n"
                               for i in range(64)))
    doc["spec"]["shards"] = 8
    [cluster_doc] = on_claim([doc], local, "data", cpu="1")
    port = _free_port()
    with Cluster(tmp_path / "cluster") as cluster:
        url = f"http://{cluster.network.gateway}:{port}/progress"
        cluster.namespace(NS)
        claim = cluster.pvc(NS, "data")
        for sub in ("models", "data"):
            shutil.copytree(local / sub, claim / sub)
        cluster.operator(NS, "--image", TRAINER_CPU_IMAGE, "--default-output-root", "pvc://data/outputs",
                         "--progress-url", url, "--progress-port", str(port), "--progress-interval", "0.2")
        cluster.api.create(cluster_doc, NS)
        seen: list[dict] = []
        deadline = time.time() + 600
        while time.time() < deadline:
            cr = cluster.api.get("TeacherGen", NS, "reporting") or {}
            status = cr.get("status") or {}
            if status.get("phase") == "Running" and status.get("progress"):
                seen.append(status["progress"])
            if status.get("phase") in ("Succeeded", "Failed"):
                break
            time.sleep(0.1)
        assert phases(cluster, NS, [cluster_doc])["TeacherGen/reporting"] == "Succeeded", \
            diagnose(cluster, NS, [cluster_doc])
        [stage_pod] = cluster.api.list("Pod", NS)

        # a pod that is not a stage pod of any CR, holding a token of the right audience
        cluster.api.call("POST", f"/api/v1/namespaces/{NS}/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rogue"},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "main", "image": "testcluster/python:3.11",
                                     "command": ["python3", "-c", ROGUE, url],
                                     "volumeMounts": [{"name": "t", "mountPath": "/var/run/secrets/branchmerge"}]}],
                     "volumes": [{"name": "t", "projected": {"sources": [
                         {"serviceAccountToken": {"audience": AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}}]}})
        cluster.wait(lambda: ((cluster.api.get("Pod", NS, "rogue") or {}).get("status") or {}).get("phase")
                     in ("Succeeded", "Failed"), 60, "the rogue pod to finish", 0.2)
        answers = json.loads(cluster.node.logs(NS, "rogue").strip().splitlines()[-1])
        final = cluster.api.get("TeacherGen", NS, "reporting")["status"]

    # live progress reached the status while the stage ran: the stage's own messages ("resuming: 0/64
    # prompts", "generating: k/64 prompts"), not the operator's. The tiny model's 64 prompts all finish in the
    # same engine steps, so the fraction may jump from 0 to published; it never goes back.
    live = [p for p in seen if p.get("message", "").endswith("/64 prompts")]
    assert live, sorted({(p.get("fraction"), p.get("message")) for p in seen})
    fractions = [p["fraction"] for p in seen]
    assert fractions == sorted(fractions), fractions
    # the stage pod had no API token: only the projected, audience-bound one
    spec = stage_pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    tokens = [s["serviceAccountToken"] for v in spec["volumes"] for s in (v.get("projected") or {}).get("sources", [])
              if "serviceAccountToken" in s]
    assert [t["audience"] for t in tokens] == [AUDIENCE]
    # refused: not a pod of a CR (403), no token (401), a token for the API server's audience (401)
    assert answers == {"bound": 403, "none": 401, "api_audience": 401}, answers
    text = json.dumps(final)
    assert "pwned" not in text and "evil" not in text and final["output"]["uri"].startswith("pvc://data/outputs/")
