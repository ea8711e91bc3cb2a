"""Driving the emulator the way kubectl and the kubelet would, for the kopf integration tests."""
from __future__ import annotations

import copy
import json
import time
import urllib.request

from branchmerge.operator.emulator import Api

from .kube_objects import NS, pod


def manifest(doc: dict) -> dict:
    """What a user applies: no server metadata, no status."""
    doc = copy.deepcopy(doc)
    doc.pop("status", None)
    for key in ("uid", "resourceVersion", "generation"):
        doc["metadata"].pop(key, None)
    return doc


def phase(api: Api, kind: str, name: str) -> str | None:
    obj = api.get(kind, NS, name)
    return ((obj or {}).get("status") or {}).get("phase")


def ready_reason(api: Api, kind: str, name: str) -> str | None:
    obj = api.get(kind, NS, name) or {}
    for cond in (obj.get("status") or {}).get("conditions", []):
        if cond["type"] == "Ready":
            return cond["reason"]
    return None


def jobs_of(api: Api, name: str) -> list[dict]:
    return sorted((j for j in api.list("Job", NS) if j["metadata"]["labels"].get("branchmerge.dev/name") == name),
                  key=lambda j: int(j["metadata"]["labels"]["branchmerge.dev/attempt"]))


def finish(api: Api, job: dict, ok: bool, *, exit_code: int | None = None, message=None, reason: str | None = None,
           disruption: str | None = None) -> None:
    """Play the kubelet and the Job controller: the pods terminate, then the Job gets its final condition."""
    name = job["metadata"]["name"]
    for index in range(job["spec"].get("completions", 1)):
        p = pod(name, exit_code=0 if ok else (exit_code if exit_code is not None else 1), message=message,
                reason=reason, index=index, disruption=disruption)
        p["metadata"]["name"] = f"{name}-{index}-{int(time.time() * 1000) % 100000}"
        api.create(p, NS)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ctype = "Complete" if ok else "Failed"
    status = {"conditions": [{"type": ctype, "status": "True", "lastTransitionTime": now,
                              "reason": "Completed" if ok else "BackoffLimitExceeded", "message": ""}]}
    status["succeeded" if ok else "failed"] = job["spec"].get("completions", 1)
    if ok:
        status["completionTime"] = now
    api.patch("Job", NS, name, {"status": status}, sub="status")


def start(api: Api, job: dict) -> None:
    """The pods run (the Job controller counts them active and, their containers up, ready)."""
    pods = job["spec"].get("completions", 1)
    api.patch("Job", NS, job["metadata"]["name"], {"status": {"active": pods, "ready": pods}}, sub="status")


def events_for(api: Api, name: str) -> list[str]:
    return [e["reason"] for e in sorted(api.list("Event", NS), key=lambda e: int(e["metadata"]["resourceVersion"]))
            if e["involvedObject"]["name"] == name]


def scrape(url: str) -> dict[str, float]:
    """Parse the Prometheus text format into {'name{labels}': value} (with the official parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def result(uri: str, **metrics) -> str:
    return json.dumps({"phase": "Succeeded", "outputUri": uri, "digest": "sha256:feed", "metrics": metrics})
