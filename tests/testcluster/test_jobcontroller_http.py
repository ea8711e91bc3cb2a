"""The Job controller stand-in against the API server stand-in over real HTTP.

The tests play the node themselves (``FakeNode``): it binds new pods and reports them Running and
Ready, finishes them when told to (``/status`` patches, as the kubelet does), and terminates pods that
are deleted (phase Failed, exit code 143, then a delete with grace 0). Each test uses its own namespace.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path

import pytest
import pytest_asyncio

from testcluster import jobapi as ja
from testcluster.client import ApiError, Client, Informer
from testcluster.jobcontroller import JobController
from testcluster.ttl import TTLController

from .apiserver_helpers import eventually

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
BASE = 0.6  # the pod-failure backoff base used here (real: 10 s)
_ns = itertools.count()


@pytest.fixture(scope="module")
def server():
    from testcluster.apiserver import ApiServer

    with ApiServer(crds_dir=REPO / "crds") as srv:
        yield srv


def job_body(name: str, *, command_ok: bool = True, **spec) -> dict:
    template = spec.pop("template", None) or {"spec": {
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
        "containers": [{"name": "main", "image": "busybox", "command": ["true" if command_ok else "false"]}]}}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"template": template, **spec}}


def is_active(pod: dict) -> bool:
    return ja.is_active(pod)


class FakeNode:
    """The kubelet's side, played by the test."""

    def __init__(self, client: Client, ns: str, auto_run: bool = True):
        self.client, self.ns, self.auto_run = client, ns, auto_run
        self.informer = Informer(client, "v1", "pods", ns, on_event=self._on_pod)
        self.max_active_per_index = 0  # the most active pods one index ever had at once (as watched)
        self.max_active_per_job: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self._busy: set[str] = set()

    async def __aenter__(self) -> "FakeNode":
        self._task = asyncio.create_task(self.informer.run())
        await self.informer.synced()
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def pods(self, job: str, active_only: bool = False) -> list[dict]:
        out = [p for p in self.informer.cache.values()
               if (p["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name") == job
               and (not active_only or is_active(p))]
        return sorted(out, key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))

    def index(self, job: str, ix: int) -> list[dict]:
        return [p for p in self.pods(job, active_only=True) if ja.completion_index(p) == ix]

    async def _on_pod(self, type_: str, pod: dict) -> None:
        per_index: dict[tuple[str, int], int] = {}
        for p in self.informer.cache.values():
            ix = ja.completion_index(p)
            if ix >= 0 and is_active(p):
                k = ((p["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name", ""), ix)
                per_index[k] = per_index.get(k, 0) + 1
        self.max_active_per_index = max([self.max_active_per_index, *per_index.values()])
        per_job: dict[str, int] = {}
        for p in self.informer.cache.values():
            if is_active(p):
                job = (p["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name", "")
                per_job[job] = per_job.get(job, 0) + 1
        for job, n in per_job.items():
            self.max_active_per_job[job] = max(n, self.max_active_per_job.get(job, 0))
        if type_ == "DELETED":
            return
        name = pod["metadata"]["name"]
        if name in self._busy:
            return
        self._busy.add(name)
        try:
            await self._act(pod)
        except ApiError as err:
            if err.status not in (404, 409, 422):
                raise
        finally:
            self._busy.discard(name)

    async def _act(self, pod: dict) -> None:
        name, meta = pod["metadata"]["name"], pod["metadata"]
        if meta.get("deletionTimestamp"):
            if not ja.is_terminal(pod):
                await self.set_status(name, "Failed", 143)
            await self.client.delete("v1", "pods", self.ns, name, grace_seconds=0)
            return
        if self.auto_run and not pod["spec"].get("nodeName"):
            await self.client.bind(self.ns, name, "node-1")
            await self.set_status(name, "Running")

    async def set_status(self, name: str, phase: str, exit_code: int = 0, conditions: list[dict] | None = None):
        now = ja.format_time(time.time())
        if phase == "Running":
            status = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True",
                                                           "lastTransitionTime": now}],
                      "containerStatuses": [{"name": "main", "ready": True, "restartCount": 0,
                                             "image": "busybox", "imageID": "", "state": {"running": {
                                                 "startedAt": now}}}]}
        else:
            status = {"phase": phase, "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now},
                                                     *(conditions or [])],
                      "containerStatuses": [{"name": "main", "ready": False, "restartCount": 0,
                                             "image": "busybox", "imageID": "", "state": {"terminated": {
                                                 "exitCode": exit_code, "startedAt": now, "finishedAt": now,
                                                 "reason": "Completed" if exit_code == 0 else "Error"}}}]}
        await self.client.patch("v1", "pods", self.ns, name, {"status": status}, sub="status")

    async def finish(self, pod: dict, exit_code: int = 0, conditions: list[dict] | None = None) -> None:
        name = pod["metadata"]["name"]
        if self.auto_run:  # let the node's own "Running" land first, as a kubelet's updates are ordered
            await eventually(lambda: ((self.informer.cache.get((self.ns, name)) or {}).get("status") or {}).get(
                "phase") != "Pending", what=f"{name} running")
        await self.set_status(pod["metadata"]["name"], "Succeeded" if exit_code == 0 else "Failed", exit_code,
                              conditions)


class Env:
    def __init__(self, server, ns: str):
        self.server, self.ns = server, ns
        self.client = Client(server.url)
        self.controller: JobController | None = None
        self._ctl_task: asyncio.Task | None = None
        self.job_versions: list[dict] = []  # every Job status the watch delivered, in order
        self._watch_task: asyncio.Task | None = None

    async def start(self):
        try:
            await self.client.create("v1", "namespaces", None, {"apiVersion": "v1", "kind": "Namespace",
                                                                "metadata": {"name": self.ns}})
        except ApiError as err:
            if err.status != 409:
                raise
        try:
            await self.client.create("v1", "nodes", None, {
                "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "labels": {
                    "kubernetes.io/hostname": "node-1"}},
                "status": {"capacity": {"cpu": "2", "memory": "24Gi", "pods": "110"},
                           "allocatable": {"cpu": "2", "memory": "24Gi", "pods": "110"}}})
        except ApiError as err:
            if err.status != 409:
                raise

        async def record(type_, job):
            self.job_versions.append(job)

        informer = Informer(self.client, "batch/v1", "jobs", self.ns, on_event=record)
        self._watch_task = asyncio.create_task(informer.run())
        await informer.synced()
        await self.start_controller()
        return self

    async def start_controller(self):
        self.controller = JobController(self.server.url, backoff_base=BASE, backoff_max=4 * BASE,
                                        batch_period=0.02, api_backoff=(0.05, 0.5), namespace=self.ns)
        self._ctl_task = asyncio.create_task(self.controller.run())
        await eventually(lambda: self.controller.ready.is_set() or self._ctl_task.done(), what="controller sync")
        if self._ctl_task.done():
            self._ctl_task.result()

    async def stop_controller(self):
        self._ctl_task.cancel()
        await asyncio.gather(self._ctl_task, return_exceptions=True)

    async def close(self):
        await self.stop_controller()
        self._watch_task.cancel()
        await asyncio.gather(self._watch_task, return_exceptions=True)
        await self.client.close()

    async def create(self, body: dict) -> dict:
        return await self.client.create("batch/v1", "jobs", self.ns, body)

    async def job(self, name: str) -> dict:
        return await self.client.get("batch/v1", "jobs", self.ns, name)

    async def status(self, name: str) -> dict:
        return (await self.job(name) or {}).get("status") or {}

    async def has_condition(self, name: str, type_: str) -> dict | None:
        for cond in (await self.status(name)).get("conditions") or []:
            if cond["type"] == type_ and cond["status"] == "True":
                return cond
        return None

    def condition_history(self, name: str) -> list[list[str]]:
        out = []
        for job in self.job_versions:
            if job["metadata"]["name"] == name:
                types = [c["type"] for c in (job.get("status") or {}).get("conditions") or []]
                if not out or out[-1] != types:
                    out.append(types)
        return out


@pytest_asyncio.fixture
async def env(server):
    e = await Env(server, f"jc-{next(_ns)}-{int(time.time() * 1000) % 100000}").start()
    yield e
    await e.close()


async def test_completions_parallelism_and_success_ordering(env):
    async with FakeNode(env.client, env.ns) as node:
        await env.create(job_body("train", completions=3, parallelism=2))
        running = await eventually(lambda: len(node.pods("train", active_only=True)) == 2
                                   and node.pods("train", active_only=True), what="two pods")
        pod = running[0]
        job = await env.job("train")
        meta = pod["metadata"]
        assert meta["name"].startswith("train-") and meta["generateName"] == "train-"
        assert "batch.kubernetes.io/job-tracking" in meta["finalizers"]
        assert meta["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": "train",
                                            "uid": job["metadata"]["uid"], "controller": True,
                                            "blockOwnerDeletion": True}]
        assert meta["labels"]["batch.kubernetes.io/controller-uid"] == job["metadata"]["uid"]
        await eventually(lambda: env.status("train"), what="status")
        st = await eventually(lambda: _when(env.status("train"), lambda s: s.get("ready") == 2), what="ready 2")
        assert st["active"] == 2 and st["startTime"]
        for pod in running:
            await node.finish(pod)
        await eventually(lambda: len(node.pods("train")) == 3, what="third pod")
        assert len(node.pods("train", active_only=True)) == 1  # never more than completions - succeeded
        await node.finish(node.pods("train", active_only=True)[0])
        done = await eventually(lambda: env.has_condition("train", "Complete"), what="Complete")
        assert done["reason"] == "CompletionsReached"
        st = await env.status("train")
        assert st["succeeded"] == 3 and "failed" not in st and st["completionTime"]
        assert st["uncountedTerminatedPods"] == {} and st.get("active", 0) == 0
        assert [c["type"] for c in st["conditions"]] == ["SuccessCriteriaMet", "Complete"]
        history = env.condition_history("train")
        assert ["SuccessCriteriaMet"] in history  # written before Complete
        await eventually(lambda: all(not ja.has_tracking_finalizer(p) for p in node.pods("train")),
                         what="finalizers removed")
        assert len(node.pods("train")) == 3  # no extra pod was ever created


async def _when(coro, pred):
    value = await coro
    return value if pred(value) else None


async def test_indexed_job(env):
    async with FakeNode(env.client, env.ns) as node:
        await env.create(job_body("idx", completions=3, parallelism=3, completionMode="Indexed"))
        await eventually(lambda: len(node.pods("idx", active_only=True)) == 3, what="three pods")
        pod = node.index("idx", 1)[0]
        assert pod["metadata"]["generateName"] == "idx-1-"
        assert pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"
        assert pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1"
        assert pod["spec"]["hostname"] == "idx-1"
        env_vars = pod["spec"]["containers"][0]["env"]
        assert {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.labels['batch.kubernetes.io/job-completion-index']"}}} in [
            {k: v for k, v in e.items() if k in ("name", "valueFrom")} for e in env_vars]
        await node.finish(node.index("idx", 0)[0])
        await node.finish(node.index("idx", 2)[0])
        await eventually(lambda: _when(env.status("idx"), lambda s: s.get("completedIndexes") == "0,2"),
                         what="completedIndexes 0,2")
        await node.finish(node.index("idx", 1)[0])
        await eventually(lambda: env.has_condition("idx", "Complete"), what="Complete")
        st = await env.status("idx")
        assert st["completedIndexes"] == "0-2" and st["succeeded"] == 3
        assert len(node.pods("idx")) == 3


async def test_backoff_limit_with_backoff_then_failed(env):
    async with FakeNode(env.client, env.ns) as node:
        await env.create(job_body("flaky", backoffLimit=1))
        first = (await eventually(lambda: node.pods("flaky", active_only=True), what="pod"))[0]
        # finishedAt has second precision: fail just after a second starts, so the backoff is measurable.
        await asyncio.sleep(1 - time.time() % 1)
        await node.finish(first, exit_code=1)
        failed_at = time.monotonic()
        second = (await eventually(lambda: [p for p in node.pods("flaky", active_only=True)
                                            if p["metadata"]["name"] != first["metadata"]["name"]],
                                   what="replacement"))[0]
        assert time.monotonic() - failed_at >= BASE - 0.1  # the pod-failure backoff held it back
        assert (await env.status("flaky"))["failed"] == 1
        await node.finish(second, exit_code=1)
        failed = await eventually(lambda: env.has_condition("flaky", "Failed"), what="Failed")
        assert failed["reason"] == "BackoffLimitExceeded"
        st = await env.status("flaky")
        assert st["failed"] == 2 and [c["type"] for c in st["conditions"]] == ["FailureTarget", "Failed"]
        assert ["FailureTarget"] in env.condition_history("flaky")
        assert len(node.pods("flaky")) == 2


POLICY = {"rules": [
    {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [2]}},
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    {"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [0]}},
]}


async def test_pod_failure_policy_fail_job_and_ignore(env):
    async with FakeNode(env.client, env.ns) as node:
        # Ignore: a disrupted pod is replaced without counting.
        await env.create(job_body("evicted", backoffLimit=0, podFailurePolicy=POLICY))
        pod = (await eventually(lambda: node.pods("evicted", active_only=True), what="pod"))[0]
        await node.finish(pod, exit_code=137, conditions=[{"type": "DisruptionTarget", "status": "True",
                                                           "reason": "EvictionByEvictionAPI"}])
        await eventually(lambda: len(node.pods("evicted", active_only=True)) == 1 and len(node.pods("evicted")) == 2,
                         what="replacement")
        assert not (await env.status("evicted")).get("failed")
        assert not await env.has_condition("evicted", "FailureTarget")

        # FailJob on exit code 2: the sibling is terminated, Failed comes once it is gone.
        await env.create(job_body("fatal", completions=2, parallelism=2, podFailurePolicy=POLICY))
        a, b = await eventually(lambda: len(node.pods("fatal", active_only=True)) == 2
                                and node.pods("fatal", active_only=True), what="two pods")
        await node.finish(a, exit_code=2)
        target = await eventually(lambda: env.has_condition("fatal", "FailureTarget"), what="FailureTarget")
        assert target["reason"] == "PodFailurePolicy" and "exit code 2" in target["message"]
        failed = await eventually(lambda: env.has_condition("fatal", "Failed"), what="Failed")
        assert failed["reason"] == "PodFailurePolicy"
        assert ["FailureTarget"] in env.condition_history("fatal")
        st = await env.status("fatal")
        assert st["failed"] == 2 and st.get("terminating") == 0
        assert all(p["metadata"]["name"] != b["metadata"]["name"] or ja.is_terminal(p) for p in node.pods("fatal"))


async def test_backoff_limit_per_index(env):
    async with FakeNode(env.client, env.ns) as node:
        await env.create(job_body("per", completions=2, parallelism=2, completionMode="Indexed",
                                  backoffLimitPerIndex=1))
        await eventually(lambda: len(node.pods("per", active_only=True)) == 2, what="two pods")
        first = node.index("per", 0)[0]
        await node.finish(first, exit_code=1)
        retry = (await eventually(lambda: [p for p in node.index("per", 0) if p["metadata"]["name"] !=
                                           first["metadata"]["name"]], what="index 0 retried"))[0]
        assert retry["metadata"]["annotations"]["batch.kubernetes.io/job-index-failure-count"] == "1"
        await node.finish(retry, exit_code=1)
        await eventually(lambda: _when(env.status("per"), lambda s: s.get("failedIndexes") == "0"),
                         what="failedIndexes 0")
        await node.finish(node.index("per", 1)[0])
        failed = await eventually(lambda: env.has_condition("per", "Failed"), what="Failed")
        assert failed["reason"] == "FailedIndexes"
        st = await env.status("per")
        assert st["completedIndexes"] == "1" and st["failed"] == 2


async def test_suspend_and_resume(env):
    async with FakeNode(env.client, env.ns) as node:
        await env.create(job_body("sus", completions=2, parallelism=2))
        await eventually(lambda: len(node.pods("sus", active_only=True)) == 2, what="two pods")
        started = (await eventually(lambda: _when(env.status("sus"), lambda s: s.get("startTime"))))["startTime"]
        await env.client.patch("batch/v1", "jobs", env.ns, "sus", {"spec": {"suspend": True}})
        cond = await eventually(lambda: env.has_condition("sus", "Suspended"), what="Suspended")
        assert cond["reason"] == "JobSuspended"
        await eventually(lambda: not node.pods("sus"), what="pods gone")  # un-tracked first, so they can go
        st = await env.status("sus")
        assert not st.get("failed") and not st.get("active") and st["startTime"] == started
        await asyncio.sleep(1.1)  # startTime has second precision
        await env.client.patch("batch/v1", "jobs", env.ns, "sus", {"spec": {"suspend": False}})
        await eventually(lambda: len(node.pods("sus", active_only=True)) == 2, what="pods again")
        st = await eventually(lambda: _when(env.status("sus"), lambda s: s.get("active") == 2))
        cond = [c for c in st["conditions"] if c["type"] == "Suspended"][0]
        assert (cond["status"], cond["reason"]) == ("False", "JobResumed")
        assert st["startTime"] > started  # the deadline clock restarted


async def test_created_suspended_then_deadline(env):
    async with FakeNode(env.client, env.ns) as node:
        await env.create(job_body("later", suspend=True))
        await eventually(lambda: env.has_condition("later", "Suspended"), what="Suspended")
        await asyncio.sleep(0.2)
        assert not node.pods("later") and "startTime" not in await env.status("later")

        await env.create(job_body("slow", activeDeadlineSeconds=1))
        pod = (await eventually(lambda: node.pods("slow", active_only=True), what="pod"))[0]
        target = await eventually(lambda: env.has_condition("slow", "FailureTarget"), timeout=10)
        assert target["reason"] == "DeadlineExceeded"
        failed = await eventually(lambda: env.has_condition("slow", "Failed"), what="Failed")
        assert failed["reason"] == "DeadlineExceeded"
        st = await env.status("slow")
        assert st["failed"] == 1
        assert all(p["metadata"]["name"] != pod["metadata"]["name"] or ja.is_terminal(p)
                   for p in node.pods("slow"))


async def test_deleted_running_pod_counts_as_failed_and_is_replaced(env):
    async with FakeNode(env.client, env.ns) as node:
        await env.create(job_body("lost", backoffLimit=3))
        pod = (await eventually(lambda: node.pods("lost", active_only=True), what="pod"))[0]
        await env.client.delete("v1", "pods", env.ns, pod["metadata"]["name"])  # e.g. its node drained
        await eventually(lambda: _when(env.status("lost"), lambda s: s.get("failed") == 1), what="failed 1")
        await eventually(lambda: node.pods("lost", active_only=True), what="replacement")


async def test_ttl_after_finished(env, server):
    ttl = TTLController(server.url, namespace=env.ns)
    task = asyncio.create_task(ttl.run())
    try:
        async with FakeNode(env.client, env.ns) as node:
            await env.create(job_body("short", ttlSecondsAfterFinished=1))
            pod = (await eventually(lambda: node.pods("short", active_only=True), what="pod"))[0]
            await node.finish(pod)
            await eventually(lambda: env.has_condition("short", "Complete"), what="Complete")
            done = await env.has_condition("short", "Complete")
            await eventually(lambda: ttl.deleted, what="the TTL deletion")
            # Not before ttlSecondsAfterFinished past the Complete condition (second precision).
            assert time.time() >= ja.parse_time(done["lastTransitionTime"]) + 1
            await eventually(lambda: _gone(env, "short"), what="job gone")
            await eventually(lambda: not node.pods("short"), what="pods collected")
            assert ttl.deleted == [(env.ns, "short")]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _gone(env, name):
    return await env.job(name) is None


async def test_restarts_never_duplicate_or_lose_pods(env):
    """Stop and restart the controller at arbitrary moments (mid-creation, mid-counting) while pods
    finish: no index ever has two active pods, no Job ever has more than its parallelism active, every
    success is counted exactly once (so no pod beyond completions is ever created)."""
    rng = random.Random(7)
    async with FakeNode(env.client, env.ns) as node:
        await env.create(job_body("many", completions=12, parallelism=6, completionMode="Indexed"))
        await env.create(job_body("plain", completions=8, parallelism=4))

        async def kubelet_finishes():
            while True:
                for job in ("many", "plain"):
                    running = [p for p in node.pods(job, active_only=True) if p["status"].get("phase") == "Running"]
                    if running:
                        await node.finish(rng.choice(running))
                await asyncio.sleep(0.015)

        finisher = asyncio.create_task(kubelet_finishes())
        try:
            for _ in range(15):
                await asyncio.sleep(rng.uniform(0, 0.06))
                await env.stop_controller()
                await asyncio.sleep(rng.uniform(0, 0.02))
                await env.start_controller()
            await eventually(lambda: _both(env), timeout=30, what="both complete")
        finally:
            finisher.cancel()
            await asyncio.gather(finisher, return_exceptions=True)
        assert node.max_active_per_index == 1
        assert node.max_active_per_job["plain"] <= 4 and node.max_active_per_job["many"] <= 6
        many, plain = await env.status("many"), await env.status("plain")
        assert many["succeeded"] == 6 * 2 and many["completedIndexes"] == "0-11"
        assert plain["succeeded"] == 8 and not plain.get("failed")
        assert len(node.pods("many")) == 12 and len(node.pods("plain")) == 8  # not one pod too many
        assert all(not ja.has_tracking_finalizer(p) for p in node.pods("many") + node.pods("plain"))


async def _both(env):
    return await env.has_condition("many", "Complete") and await env.has_condition("plain", "Complete")


async def test_deleting_the_job_frees_its_pods(env):
    """Background deletion: the garbage collector deletes the pods; the controller removes the tracking
    finalizer of pods whose Job is gone, so they can go. Orphan deletion (batch/v1's default): the pods
    stay, without owner reference and without the finalizer."""
    async with FakeNode(env.client, env.ns) as node:
        await env.create(job_body("gone", completions=2, parallelism=2))
        await env.create(job_body("orphaned", completions=2, parallelism=2))
        await eventually(lambda: len(node.pods("gone", active_only=True)) == 2
                         and len(node.pods("orphaned", active_only=True)) == 2, what="pods")
        await env.client.delete("batch/v1", "jobs", env.ns, "gone", propagation="Background")
        await env.client.delete("batch/v1", "jobs", env.ns, "orphaned")
        await eventually(lambda: not node.pods("gone"), what="pods of the deleted Job gone")
        await eventually(lambda: all(not ja.has_tracking_finalizer(p) and not p["metadata"].get("ownerReferences")
                                     for p in node.pods("orphaned")), what="orphans un-tracked")
        assert len(node.pods("orphaned", active_only=True)) == 2


async def test_threaded_start_and_stop(env, server):
    await env.stop_controller()  # this test runs its own, in a thread
    ctl = JobController(server.url, batch_period=0.02, namespace=env.ns).start()
    try:
        async with FakeNode(env.client, env.ns) as node:
            await env.create(job_body("threaded"))
            pod = (await eventually(lambda: node.pods("threaded", active_only=True), what="pod"))[0]
            await node.finish(pod)
            await eventually(lambda: env.has_condition("threaded", "Complete"), what="Complete")
    finally:
        ctl.stop()
        await env.start_controller()
    assert ctl.syncs > 0 and ctl.error is None


async def test_survives_api_faults(env, server):
    """Failed creations, status writes (500, 409) and finalizer patches, cut watches and a compacted
    history (410 → relist): the Job still completes with exact counts and no extra pod."""
    ns = env.ns
    server.faults.add(500, "POST", rf"/namespaces/{ns}/pods", count=3)
    server.faults.add(500, "PUT", rf"/namespaces/{ns}/jobs/[^/]+/status", count=3)
    server.faults.add(409, "PUT", rf"/namespaces/{ns}/jobs/[^/]+/status", count=2)
    server.faults.add(500, "PATCH", rf"/namespaces/{ns}/pods/[^/?]+(\?|$)", count=3)
    async with FakeNode(env.client, env.ns) as node:
        await env.create(job_body("chaos", completions=4, parallelism=2, completionMode="Indexed"))
        finished: set[str] = set()
        for round_ in range(4):
            pods = await eventually(lambda: [p for p in node.pods("chaos", active_only=True)
                                             if p["status"].get("phase") == "Running"
                                             and p["metadata"]["name"] not in finished], what="a running pod")
            await node.finish(pods[0])
            finished.add(pods[0]["metadata"]["name"])
            if round_ == 1:
                server.faults.drop_watches()
                server.compact()
        await eventually(lambda: env.has_condition("chaos", "Complete"), timeout=20, what="Complete")
    st = await env.status("chaos")
    assert st["succeeded"] == 4 and st["completedIndexes"] == "0-3" and not st.get("failed")
    assert len(node.pods("chaos")) == 4 and node.max_active_per_index == 1
    assert server.faults.injected["500"] >= 6 and server.faults.injected["409"] >= 1
