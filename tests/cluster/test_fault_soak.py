"""Fault soak: a pipeline of Merges runs through the operator on the stand-in cluster while at least 50
random faults hit it, then every CR must have ended right and every output must be whole.

Faults (seeded, one every 0.1-1.5 s from the start until 50 were injected; should the pipeline finish
first, the idle control plane gets the rest; at most one pod fate waits for a pod at a time): the
operator process killed (SIGKILL) and restarted; watch history compacted and every watch cut (clients
get 410 Gone and relist); API answers 500, 503, 429 and 409 and requests delayed past the operator
client's 30 s timeout; pods OOM-killed, evicted, preempted, stuck in ImagePullBackOff for a while; the
node lost (its pods deleted by the taint manager) and back.

Checked at the end: every CR Succeeded with Ready=True and observedGeneration = generation; its
status.output.digest is the digest of what is published, and the published folder holds exactly the
files its manifest lists, with those digests (nothing half-written); each CR's Jobs are attempts 1..N
with distinct names and status.attempts = N, at most one of them ran a pod to success (nothing
published twice), and each Merge's tensors equal a merge of the same inputs computed here.
"""
from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from pathlib import Path

from branchmerge.api.outputs import combined_digest, is_card, read_manifest
from testcluster.cluster import TRAINER_CPU_IMAGE, Cluster

from tests.conftest import manifest
from .helpers import NEEDS_IMAGES, diagnose, phases

pytestmark = NEEDS_IMAGES

NS = "soak"
MIN_FAULTS = 50
SEED = 20261204
POLICY = {"backoffLimit": 30, "backoffSeconds": 1}


def _models(claim: Path) -> None:
    """Three small safetensors models sharing a base: what the Merges read."""
    from branchmerge.trainer.tiny import perturbed, random_tensors, write_model

    shapes = {"model.embed_tokens.weight": (64, 32), "model.layers.0.mlp.up_proj.weight": (64, 32),
              "model.layers.0.input_layernorm.weight": (32,), "lm_head.weight": (64, 32)}
    base = random_tensors(shapes, 0)
    write_model(claim / "models" / "base", base)
    for seed, name in ((1, "a"), (2, "b")):
        write_model(claim / "models" / name, perturbed(base, seed, 0.05))


def _merge(name: str, method: str, models: list[dict], base: dict | None = None, **spec) -> dict:
    body = {"method": method, "models": models, "runPolicy": POLICY, "resources": {"cpu": "1"}, **spec}
    if base:
        body["base"] = base
    return manifest("Merge", name, body)


def _pipeline() -> list[dict]:
    """Independent merges and a chain three deep (each waits for its upstream's output)."""
    uri = {m: {"uri": f"pvc://soak/models/{m}"} for m in ("base", "a", "b")}
    ref = lambda n: {"from": {"kind": "Merge", "name": n}}  # noqa: E731
    docs = [_merge(f"lin-{i}", "linear", [uri["a"], {**uri["b"], "weight": 1.0 + i}]) for i in range(4)]
    docs += [_merge(f"ta-{i}", "task_arithmetic", [uri["a"], uri["b"]], uri["base"],
                    parameters={"lambda": 0.5 + 0.25 * i}) for i in range(3)]
    docs += [_merge("chain-1", "ties", [uri["a"], uri["b"]], uri["base"], parameters={"density": 0.5}),
             _merge("chain-2", "linear", [ref("chain-1"), uri["a"]]),
             _merge("chain-3", "slerp", [ref("chain-2"), uri["b"]], ref("chain-2"), parameters={"t": 0.3})]
    return docs


def _observe(cluster: Cluster, docs: list[dict]) -> dict[str, str | None]:
    """The CRs' phases, read as a user's kubectl would: retried when an injected fault answers instead."""
    import urllib.error

    for _ in range(20):
        try:
            return phases(cluster, NS, docs)
        except urllib.error.HTTPError as err:
            if err.code not in (409, 429, 500, 503):
                raise
            time.sleep(0.2)
    raise AssertionError("the API server kept failing the test's own reads")


class Chaos:
    """Draws and injects one fault at a time; counts what it did."""

    def __init__(self, cluster: Cluster, operator, rng: random.Random):
        self.cluster, self.operator, self.rng = cluster, operator, rng
        self.done: Counter = Counter()
        self.node_lost_at: float | None = None

    POD_FAULTS = ("pod_oom", "pod_evicted", "pod_preempted", "pod_image_pull", "node_lost")

    def _pod_fault_pending(self) -> bool:
        """A pod fate waits for the next stage pod to start: queue one at a time, or every retry of a CR would
        meet the next queued fate and the pipeline would only move once the chaos stops."""
        added = sum(self.done[k] for k in self.POD_FAULTS)
        return added > sum(self.cluster.node.fates.applied.values())

    def one(self) -> None:
        server, fates = self.cluster.server, self.cluster.node.fates
        kinds = ["operator_killed", "watch_410", "api_500", "api_503", "api_429", "api_409", "api_timeout",
                 "pod_oom", "pod_evicted", "pod_preempted", "pod_image_pull", "node_lost"]
        weights = [6, 8, 14, 8, 6, 10, 2, 6, 6, 4, 4, 2]
        if self._pod_fault_pending():
            weights = [0 if k in self.POD_FAULTS else w for k, w in zip(kinds, weights)]
        kind = self.rng.choices(kinds, weights=weights)[0]
        stage_pods = "branchmerge.dev/kind=Merge"
        if kind == "operator_killed":
            self.operator.kill()
            time.sleep(self.rng.uniform(0.2, 2.0))
            self.operator.start()
        elif kind == "watch_410":
            server.compact()
            server.faults.drop_watches()
        elif kind in ("api_500", "api_503", "api_429"):
            status = int(kind[-3:])
            method = self.rng.choice([None, "GET", "POST", "PATCH"])
            server.faults.add(status, method=method, path_regex=self.rng.choice(
                [r"/jobs", r"/configmaps", r"/merges", r"/pods", None]), count=self.rng.randint(1, 3))
        elif kind == "api_409":
            server.faults.add(409, method="PATCH", path_regex=r"/merges/[^/]+/status", count=1)
        elif kind == "api_timeout":
            server.faults.add_delay(31.0, method=self.rng.choice(["POST", "PATCH"]),
                                    path_regex=r"/(jobs|configmaps|merges)", count=1)
        elif kind == "pod_oom":
            fates.add(stage_pods, "OOMKilled", after=self.rng.uniform(0.2, 2.0))
        elif kind == "pod_evicted":
            fates.add(stage_pods, "Evicted", after=self.rng.uniform(0.2, 2.0))
        elif kind == "pod_preempted":
            fates.add(stage_pods, "Preempted", after=self.rng.uniform(0.2, 1.5))
        elif kind == "pod_image_pull":
            fates.add(stage_pods, "ImagePullBackOff", after=self.rng.uniform(1.0, 4.0))
        elif kind == "node_lost":
            if self.node_lost_at is not None:
                return
            fates.add(stage_pods, "NodeLost", after=self.rng.uniform(0.2, 1.0))
            self.node_lost_at = time.time()
        self.done[kind] += 1


def test_pipeline_survives_fifty_random_faults(tmp_path):
    rng = random.Random(SEED)
    docs = _pipeline()
    started = time.time()
    with Cluster(tmp_path / "cluster", job_backoff=0.5) as cluster:
        cluster.namespace(NS)
        claim = cluster.pvc(NS, "soak")
        _models(claim)
        op = cluster.operator(NS, "--image", TRAINER_CPU_IMAGE, "--default-output-root", "pvc://soak/outputs")
        for doc in docs:
            cluster.api.create(doc, NS)
        chaos = Chaos(cluster, op, rng)
        deadline = time.time() + 1200
        while time.time() < deadline:
            now = _observe(cluster, docs)
            done = all(p == "Succeeded" for p in now.values())
            if (done and sum(chaos.done.values()) >= MIN_FAULTS) or "Failed" in now.values():
                break
            if sum(chaos.done.values()) < MIN_FAULTS:  # then the faults stop and the pipeline must settle
                chaos.one()
            if cluster.node.lost and chaos.node_lost_at and time.time() - chaos.node_lost_at > 3:
                cluster.node.recover()
                chaos.node_lost_at = None
            time.sleep(rng.uniform(0.1, 1.5))  # ~50 faults over the first minute or so of the run
        cluster.server.faults.clear()
        cluster.node.fates.clear()
        if cluster.node.lost:
            cluster.node.recover()
        if not op.alive:
            op.start()
        try:  # with the faults over, every CR must settle Succeeded
            cluster.wait(lambda: all(p == "Succeeded" for p in phases(cluster, NS, docs).values()), 300,
                         "every CR to succeed after the faults")
        except AssertionError as err:
            raise AssertionError(f"{err}\nfaults: {dict(chaos.done)}\n{diagnose(cluster, NS, docs)}") from None
        time.sleep(2.0)  # let a restarted operator settle before reading the final state
        crs = {d["metadata"]["name"]: cluster.api.get("Merge", NS, d["metadata"]["name"]) for d in docs}
        jobs = cluster.api.list("Job", NS)
        pods = cluster.api.list("Pod", NS)
        injected = dict(cluster.server.faults.injected)
        applied = dict(cluster.node.fates.applied)
        wall = time.time() - started

    total = sum(chaos.done.values())
    print(f"\nfault soak: {len(docs)} Merges, {total} faults drawn in {wall:.0f} s: {dict(sorted(chaos.done.items()))}; "
          f"API server injected {injected}; node applied {applied}; operator started {op.starts}x")
    assert total >= MIN_FAULTS
    for name, cr in crs.items():
        status = cr["status"]
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert status["phase"] == "Succeeded" and ready["status"] == "True", (name, status)
        assert status["observedGeneration"] == cr["metadata"]["generation"], (name, status)
        folder = claim / "outputs" / NS / "merge" / name
        files = read_manifest(folder)
        assert files is not None, f"{name}: no manifest in {folder}"
        # the model card (README.md, _card/) is about the output, not part of it (api/outputs.py)
        on_disk = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in folder.rglob("*") if p.is_file() and p.name != "_manifest.json"
                   and not is_card(p.relative_to(folder).as_posix())}
        assert (folder / "README.md").is_file(), f"{name}: no model card"
        assert on_disk == files, f"{name}: published files differ from their manifest"
        assert status["output"]["digest"] == combined_digest(files), name
        mine = sorted((j for j in jobs if j["metadata"]["labels"].get("branchmerge.dev/name") == name),
                      key=lambda j: int(j["metadata"]["labels"]["branchmerge.dev/attempt"]))
        attempts = [int(j["metadata"]["labels"]["branchmerge.dev/attempt"]) for j in mine]
        # Jobs of finished attempts may be gone (a TTL, or the node-lost cleanup), never duplicated
        assert len(set(j["metadata"]["name"] for j in mine)) == len(mine) and len(set(attempts)) == len(attempts)
        assert attempts and max(attempts) == status["attempts"], (name, attempts, status["attempts"])
        succeeded = [p for p in pods if p["metadata"]["labels"].get("branchmerge.dev/name") == name and
                     p["status"].get("phase") == "Succeeded"]
        assert len(succeeded) <= 1, f"{name}: {len(succeeded)} pods published it"
    no_leftovers = [p.name for p in (claim / "outputs" / NS / "merge").iterdir() if p.name.startswith(".tmp-")]
    assert not no_leftovers or all(not (claim / "outputs" / NS / "merge" / n / "_manifest.json").exists()
                                   for n in no_leftovers)
