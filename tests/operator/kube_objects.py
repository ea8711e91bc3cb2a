"""Plain-dict CRs, Jobs and Pods for the operator tests (what the API server and kubelet would show)."""
from __future__ import annotations

import copy
import json

from tests.conftest import manifest

NS = "ns"


def cr(kind: str, name: str, spec: dict, *, generation: int = 1, status: dict | None = None, **meta) -> dict:
    """A CR as the API server stores it: the manifest plus the metadata the server sets."""
    doc = manifest(kind, name, copy.deepcopy(spec), metadata={"namespace": NS, "uid": f"uid-{name}",
                                                              "generation": generation, "resourceVersion": "1", **meta})
    if status is not None:
        doc["status"] = status
    return doc


MERGE_SPEC = {"method": "linear", "models": [{"uri": "pvc://models/a"}, {"uri": "pvc://models/b"}],
              "output": {"uri": "pvc://models/merged"}}
SFT_SPEC = {"base": {"uri": "hf://org/base@main"}, "data": [{"uri": "pvc://data/train.jsonl"}],
            "training": {"globalBatchSize": 8, "microBatchSize": 1},
            "output": {"uri": "pvc://models/sft"}, "resources": {"nodes": 2, "gpusPerNode": 4, "shmSize": "16Gi"}}
TG_SPEC = {"teacher": {"model": {"uri": "pvc://models/teacher"}, "engine": {"dataParallelSize": 2}},
           "prompts": {"dataset": {"uri": "pvc://data/prompts.jsonl"}},
           "output": {"uri": "pvc://data/traces"}, "resources": {"nodes": 2}}
EVAL_SPEC = {"model": {"uri": "pvc://models/merged"},
             "benchmarks": [{"name": "aime", "kind": "math", "dataset": {"uri": "pvc://data/aime.jsonl"}}],
             "output": {"uri": "pvc://results/eval"}}


def pipeline() -> list[dict]:
    """TeacherGen -> BranchSFT -> Merge -> Eval, chained with from: references (single-pod each)."""
    return [
        cr("TeacherGen", "gen", {"teacher": {"model": {"uri": "pvc://models/teacher"}},
                                 "prompts": {"dataset": {"uri": "pvc://data/prompts.jsonl"}},
                                 "output": {"uri": "pvc://data/traces"}}),
        cr("BranchSFT", "sft", {"base": {"uri": "pvc://models/base"},
                                "data": [{"from": {"kind": "TeacherGen", "name": "gen"}}],
                                "training": {"globalBatchSize": 8, "microBatchSize": 1},
                                "output": {"uri": "pvc://models/sft"}}),
        cr("Merge", "merge", {"method": "linear", "models": [{"from": {"kind": "BranchSFT", "name": "sft"}},
                                                             {"uri": "pvc://models/other"}],
                              "output": {"uri": "pvc://models/merged"}}),
        cr("Eval", "eval", {"model": {"from": {"kind": "Merge", "name": "merge"}},
                            "benchmarks": [{"name": "aime", "kind": "math",
                                            "dataset": {"uri": "pvc://data/aime.jsonl"}}],
                            "output": {"uri": "pvc://results/eval"}}),
    ]


def finish_job(job: dict, ok: bool, *, reason: str = "BackoffLimitExceeded", when: str = "2026-01-01T00:00:00Z",
               message: str = "") -> dict:
    job = copy.deepcopy(job)
    ctype = "Complete" if ok else "Failed"
    job["status"] = {"conditions": [{"type": ctype, "status": "True", "reason": reason if not ok else "Completed",
                                     "message": message, "lastTransitionTime": when}]}
    if ok:
        job["status"]["completionTime"] = when
        job["status"]["succeeded"] = job["spec"].get("completions", 1)
    else:
        job["status"]["failed"] = 1
    return job


def pod(job_name: str, *, exit_code: int = 0, message: dict | str | None = None, reason: str | None = None,
        index: int = 0, disruption: str | None = None, evicted: bool = False) -> dict:
    text = json.dumps(message) if isinstance(message, dict) else (message or "")
    term = {"exitCode": exit_code, "message": text, "reason": reason or ("Completed" if exit_code == 0 else "Error")}
    doc = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{job_name}-{index}-abcde", "namespace": NS,
                        "labels": {"branchmerge.dev/job": job_name},
                        "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
           "status": {"phase": "Succeeded" if exit_code == 0 else "Failed",
                      "containerStatuses": [{"name": "stage", "state": {"terminated": term}}]}}
    if disruption:
        doc["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": disruption,
                                        "message": "preempted by a higher priority pod"}]
    if evicted:
        doc["status"]["reason"] = "Evicted"
        doc["status"]["message"] = "The node was low on resource: memory."
    return doc


def result_message(uri: str, **metrics) -> dict:
    return {"phase": "Succeeded", "outputUri": uri, "digest": "sha256:abc", "metrics": metrics}
