"""Chaos: the operator is restarted at random points (>= 20 times) while a pipeline runs and Jobs finish,
fail and retry underneath it. Level-triggered reconciles with deterministic child names must leave no
duplicate children and the right final status."""
from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from branchmerge.operator.emulator import Api, EmulatorThread, OperatorThread
from branchmerge.operator.options import OperatorOptions

from .emulator_driver import events_for, finish, jobs_of, manifest, phase, result
from .kube_objects import NS, pipeline

KINDS = {"gen": "TeacherGen", "sft": "BranchSFT", "merge": "Merge", "eval": "Eval"}


def kubelet_step(api: Api, rng: random.Random, failures: Counter) -> None:
    """Finish some unfinished Jobs: the first attempt of each CR fails retryably once, later ones succeed."""
    for job in api.list("Job", NS):
        if (job.get("status") or {}).get("conditions") or rng.random() < 0.5:
            continue
        name = job["metadata"]["labels"]["branchmerge.dev/name"]
        if failures[name] == 0:
            failures[name] += 1
            finish(api, job, False, exit_code=143)  # SIGTERM: retryable
        else:
            finish(api, job, True, message=result(f"pvc://out/{name}"))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_restarts_during_a_pipeline_leave_no_duplicates():
    rng = random.Random(1234)
    docs = pipeline()
    for doc in docs:
        doc["spec"]["runPolicy"] = {"backoffLimit": 3, "backoffSeconds": 0}
    failures: Counter = Counter()
    restarts = 0
    with EmulatorThread() as emu:
        api = Api(emu.url)
        for doc in docs:
            api.create(manifest(doc), NS)
        while restarts < 22 or any(phase(api, k, n) != "Succeeded" for n, k in KINDS.items()):
            with OperatorThread(emu.url, OperatorOptions(), namespaces=[NS], metrics_port=None, workers=4):
                deadline = time.time() + rng.uniform(0.1, 1.2)  # stop at a random point
                while time.time() < deadline:
                    kubelet_step(api, rng, failures)
                    time.sleep(rng.uniform(0.0, 0.1))
            restarts += 1
            assert restarts < 80, "pipeline did not converge"
        with OperatorThread(emu.url, OperatorOptions(), namespaces=[NS], metrics_port=None):
            time.sleep(1.0)  # a final, undisturbed operator must find nothing left to do
        check_final_state(api)
    assert restarts >= 20


def check_final_state(api: Api) -> None:
    final = {n: api.get(k, NS, n) for n, k in KINDS.items()}
    for name, kind in KINDS.items():
        status = final[name]["status"]
        assert status["phase"] == "Succeeded" and status["attempts"] == 2, (name, status)
        # the URI the operator resolved from the spec, not the one the (fake) pod reported (pvc://out/<name>)
        assert status["output"]["uri"] == final[name]["spec"]["output"]["uri"]
        jobs = jobs_of(api, name)
        assert [j["metadata"]["labels"]["branchmerge.dev/attempt"] for j in jobs] == ["1", "2"], name
        cms = [c for c in api.list("ConfigMap", NS) if c["metadata"]["labels"].get("branchmerge.dev/name") == name]
        assert len(cms) == 1
        # Events are posted after the status write: a restart in between may lose one, never repeat one.
        reasons = events_for(api, name)
        assert reasons.count("Succeeded") <= 1, (name, reasons)
    # downstreams only ever ran on their upstream's output
    sft_cm = [c for c in api.list("ConfigMap", NS) if c["metadata"]["labels"].get("branchmerge.dev/name") == "sft"][0]
    assert "pvc://data/traces" in sft_cm["data"]["spec.yaml"] and "pvc://out/" not in sft_cm["data"]["spec.yaml"]
