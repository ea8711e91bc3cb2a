"""CR lifecycle through the operator on the stand-in cluster, where a real cluster differs from a tidy
event stream:

- a CRD upgrade that gives an optional field a default changes every stored CR's spec as the API server
  reads it, without a new generation: a finished CR must stay finished (no new Job) until its spec is
  edited or a rerun is asked for with the ``branchmerge.dev/rerun`` annotation (once per new value);
- deletions that happen while the operator's watches are down are not replayed after a 410 relist: a Job
  deleted in the gap must give its CR a new attempt, a CR deleted in the gap must leave the operator's
  view (its downstream goes to UpstreamNotFound);
- a CR deleted and re-created at once under the same name must not adopt the children of the old one
  (same names, same labels) that the asynchronous garbage collector has not removed yet: it waits for
  them to go and runs its own Job.

Each test is a few Merges of two tiny models (one pod each, or none).
"""
from __future__ import annotations

import contextlib
import copy
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import yaml

from testcluster.cluster import REPO, TRAINER_CPU_IMAGE, Cluster, OperatorProcess

from .helpers import NEEDS_IMAGES, diagnose
from .test_fault_soak import _models

pytestmark = NEEDS_IMAGES

NS = "lc"
RERUN = "branchmerge.dev/rerun"



def _merge(name: str, models: list[dict] | None = None, **spec) -> dict:
    body = {"method": "linear", "models": models or [{"uri": f"pvc://{NS}/models/a"}, {"uri": f"pvc://{NS}/models/b"}],
            "runPolicy": {"backoffLimit": 3, "backoffSeconds": 1}, "resources": {"cpu": "1"}, **spec}
    return {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge", "metadata": {"name": name}, "spec": body}


@contextlib.contextmanager
def _cluster(tmp_path: Path, **server) -> Iterator[tuple[Cluster, OperatorProcess]]:
    """A cluster with the models on a claim and the operator running."""
    cluster = Cluster(tmp_path / "cluster", job_backoff=0.5)
    for key, value in server.items():  # e.g. a slower garbage collector (ApiServer's own settings)
        setattr(cluster.server, key, value)
    with cluster:
        cluster.namespace(NS)
        _models(cluster.pvc(NS, NS))
        yield cluster, cluster.operator(NS, "--image", TRAINER_CPU_IMAGE, "--default-output-root",
                                        f"pvc://{NS}/outputs")


def _cr(cluster: Cluster, name: str) -> dict:
    return cluster.api.get("Merge", NS, name) or {}


def _status(cluster: Cluster, name: str) -> dict:
    return _cr(cluster, name).get("status") or {}


def _reason(cluster: Cluster, name: str) -> str | None:
    ready = next((c for c in _status(cluster, name).get("conditions", []) if c["type"] == "Ready"), {})
    return ready.get("reason")


def _jobs(cluster: Cluster, name: str) -> list[dict]:
    return [j for j in cluster.api.list("Job", NS)
            if (j["metadata"].get("labels") or {}).get("branchmerge.dev/name") == name]


def _owner_uid(obj: dict) -> str | None:
    return next((r.get("uid") for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")), None)


def _wait_phase(cluster: Cluster, docs: list[dict], name: str, phase: str, timeout: float = 180) -> dict:
    try:
        cluster.wait(lambda: _status(cluster, name).get("phase") == phase, timeout, f"Merge/{name} to be {phase}")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{diagnose(cluster, NS, docs)}") from None
    return _cr(cluster, name)


def _settled(cluster: Cluster, docs: list[dict], probe: str) -> None:
    """A barrier after an operator (re)start: a new CR naming a missing upstream is answered (Waiting,
    UpstreamNotFound) only once the operator has listed everything and worked its queue; then a little
    more time for the reconciles that started with it."""
    cluster.api.create(_merge(probe, [{"from": {"kind": "Merge", "name": "does-not-exist"}},
                                      {"uri": f"pvc://{NS}/models/a"}]), NS)
    docs.append(_merge(probe))
    cluster.wait(lambda: _reason(cluster, probe) == "UpstreamNotFound", 120, f"{probe}: the operator answers")
    time.sleep(3.0)


def test_crd_upgrade_with_a_new_default_keeps_finished_crs_finished_until_a_rerun(tmp_path):
    with _cluster(tmp_path) as (cluster, op):
        docs = [_merge("m")]
        cluster.api.create(docs[0], NS)
        done = _wait_phase(cluster, docs, "m", "Succeeded")
        before = {j["metadata"]["name"] for j in _jobs(cluster, "m")}
        assert len(before) == 1 and done["status"]["attempts"] == 1

        # The upgrade: the operator goes down, the new CRD gives spec.parameters.normalize (optional until
        # now; the stage already treats unset as true) a default, the new operator comes up. The stored Merge
        # now reads with normalize: true -- same generation, new resolved spec, new run hash.
        op.stop()
        crd = yaml.safe_load((REPO / "crds" / "branchmerge.dev_merges.yaml").read_text())
        version = crd["spec"]["versions"][0]
        params = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["parameters"]
        params["properties"]["normalize"]["default"] = True
        cluster.server.install_crd(crd)
        upgraded = _cr(cluster, "m")
        assert upgraded["spec"]["parameters"]["normalize"] is True
        assert upgraded["metadata"]["generation"] == done["metadata"]["generation"]
        op.start()
        _settled(cluster, docs, "probe-1")
        assert {j["metadata"]["name"] for j in _jobs(cluster, "m")} == before, diagnose(cluster, NS, docs)
        after = _status(cluster, "m")
        assert after["phase"] == "Succeeded" and after["output"] == done["status"]["output"], after

        # An explicit rerun: a new annotation value runs it once more (with the spec as read now).
        cluster.api.patch("Merge", NS, "m", {"metadata": {"annotations": {RERUN: "2026-12-06"}}})

        def rerun_done() -> bool:  # the Rerun condition is written with the run's start (Running)
            status = _status(cluster, "m")
            rerun = next((c for c in status.get("conditions", []) if c["type"] == "Rerun"), {})
            return rerun.get("message") == "2026-12-06" and status.get("phase") == "Succeeded"

        try:
            cluster.wait(rerun_done, 180, "the rerun to succeed")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{diagnose(cluster, NS, docs)}") from None
        names = {j["metadata"]["name"] for j in _jobs(cluster, "m")}
        assert len(names) == 2 and before < names and _status(cluster, "m")["attempts"] == 1
        pods = [p for p in cluster.api.list("Pod", NS) if p["metadata"]["labels"].get("branchmerge.dev/name") == "m"
                and p["status"].get("phase") == "Succeeded"]
        assert len(pods) == 2, "the first run and the rerun each ran one pod"

        # Once: neither another reconcile nor an operator restart starts it again for the same value.
        op.restart()
        _settled(cluster, docs, "probe-2")
        assert {j["metadata"]["name"] for j in _jobs(cluster, "m")} == names, diagnose(cluster, NS, docs)
        assert _status(cluster, "m")["phase"] == "Succeeded"


def test_deletions_during_a_watch_gap_are_noticed_after_the_relist(tmp_path):
    with _cluster(tmp_path) as (cluster, op):
        # "stuck": its pod is never scheduled, so its Job stays active; "up": suspended (a Job, no pod);
        # "down": waits for "up".
        cluster.node.fates.add("branchmerge.dev/name=stuck", "NeverScheduled")
        docs = [_merge("stuck"), _merge("up", resources={"cpu": "1", "suspend": True}),
                _merge("down", [{"from": {"kind": "Merge", "name": "up"}}, {"uri": f"pvc://{NS}/models/b"}])]
        for doc in docs:
            cluster.api.create(doc, NS)
        cluster.wait(lambda: _status(cluster, "stuck").get("phase") == "Running" and _jobs(cluster, "stuck")
                     and _status(cluster, "up").get("phase") == "Suspended"
                     and _reason(cluster, "down") == "UpstreamNotReady", 120, "the three CRs to settle")
        (job,) = _jobs(cluster, "stuck")

        # The gap: the operator is frozen, its watches are cut, the Job (as its TTL controller would) and
        # the upstream CR are deleted, and the history is compacted: when the operator wakes up its watches
        # get 410 Gone and relist, and no DELETED event is ever delivered.
        os.killpg(op.proc.pid, signal.SIGSTOP)
        try:
            cluster.server.faults.drop_watches()
            cluster.api.call("DELETE", cluster.api.path("Job", NS, job["metadata"]["name"]),
                             {"propagationPolicy": "Background"})
            cluster.api.delete("Merge", NS, "up")
            cluster.wait(lambda: not _jobs(cluster, "stuck") and not _cr(cluster, "up"), 30, "the deletions")
            cluster.server.compact()
        finally:
            os.killpg(op.proc.pid, signal.SIGCONT)

        try:
            cluster.wait(lambda: _reason(cluster, "down") == "UpstreamNotFound", 60,
                         "down to see that its upstream is gone")
            cluster.wait(lambda: _status(cluster, "stuck").get("attempts") == 2, 60, "stuck's next attempt")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{diagnose(cluster, NS, docs)}") from None
        done = _wait_phase(cluster, docs, "stuck", "Succeeded")  # attempt 2 has no fate: it runs
        assert done["status"]["attempts"] == 2
        assert [j["metadata"]["labels"]["branchmerge.dev/attempt"] for j in _jobs(cluster, "stuck")] == ["2"]


def test_a_cr_recreated_under_the_same_name_runs_its_own_children(tmp_path):
    # A garbage collector slower than the operator (seconds, as on a busy cluster): the old CR's
    # ConfigMap and Job are still there, under the very names the new CR's children get, when the
    # operator first reconciles the new CR. (A pass runs 3 s after a relevant change and no periodic
    # pass, so the deletion below is collected 3 s after it, not by a pass that happens to be due.)
    with _cluster(tmp_path, gc_delay=3.0, gc_interval=3600.0) as (cluster, op):
        docs = [_merge("m")]
        cluster.api.create(copy.deepcopy(docs[0]), NS)
        old = _wait_phase(cluster, docs, "m", "Succeeded")
        old_uid = old["metadata"]["uid"]
        time.sleep(3.5)  # a pass due for the old pod's changes has run
        cluster.api.delete("Merge", NS, "m")
        new_uid = cluster.api.create(copy.deepcopy(docs[0]), NS)["metadata"]["uid"]
        assert new_uid != old_uid
        assert any(_owner_uid(j) == old_uid for j in _jobs(cluster, "m")), "the old Job is already gone"

        new = _wait_phase(cluster, docs, "m", "Succeeded")
        assert new["metadata"]["uid"] == new_uid
        jobs = _jobs(cluster, "m")
        mine = [j for j in jobs if _owner_uid(j) == new_uid]
        assert mine and all(_owner_uid(j) == new_uid for j in jobs), \
            [(_owner_uid(j), j["metadata"]["name"]) for j in jobs]
        job_uids = {j["metadata"]["uid"] for j in mine}
        ran = [p for p in cluster.api.list("Pod", NS) if _owner_uid(p) in job_uids
               and p["status"].get("phase") == "Succeeded"]
        assert len(ran) == 1, "the new CR's own Job ran its pod"
        configmaps = [c for c in cluster.api.list("ConfigMap", NS)
                      if (c["metadata"].get("labels") or {}).get("branchmerge.dev/name") == "m"]
        assert configmaps and all(_owner_uid(c) == new_uid for c in configmaps)
        assert new["status"]["output"]["digest"]
        # while the old children were there, the new CR said why it waited (status and Event)
        waited = [e for e in cluster.api.list("Event", NS) if e.get("reason") == "WaitingForGarbageCollection"
                  and e["involvedObject"].get("uid") == new_uid]
        assert waited and "garbage collector" in waited[0]["message"], waited
