"""What the operator asks of a real API server: the Jobs it lists and watches are selected by the server
(a cluster-wide operator must not stream every Job of the cluster), ``--namespace`` globs are refused at
start-up instead of silently serving nothing, and the stage Jobs it builds are accepted by the API-server
stand-in as written (pod securityContext, default requests, /dev/shm)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest

from branchmerge.api.labels import MANAGED_BY, MANAGED_BY_VALUE
from branchmerge.operator.controller import settings
from branchmerge.operator.emulator import Api, OperatorThread
from branchmerge.operator.naming import owner_labels
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import target
from branchmerge.operator.pods.job import build_job
from testcluster.apiserver import ApiServer
from testcluster.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
SELECTOR = f"{MANAGED_BY}={MANAGED_BY_VALUE}"
# A list or watch of Jobs (cluster-wide or in a namespace) whose query lacks the owned-Jobs label selector,
# in the encoded form kopf sends or plain.
UNSELECTED_JOBS = (r"^/apis/batch/v1/(namespaces/[^/?]+/)?jobs(?![^?]*/)"
                   r"(?![^#]*labelSelector=app\.kubernetes\.io(%2F|/)managed-by(%3D|=)branchmerge-operator)")

pytestmark = pytest.mark.timeout(180)


def _namespace(api: Api, name: str) -> None:
    api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


def _job(name: str, labels: dict) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
            "spec": {"suspend": True, "template": {"spec": {
                "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}}}}


def test_settings_select_owned_jobs_on_the_server():
    s = settings(None, clusterwide=True)
    from kopf._cogs.structs.references import Resource  # kopf's own matching of a selector to a resource

    jobs = Resource("batch", "v1", "jobs", namespaced=True)
    pods = Resource("", "v1", "pods", namespaced=True)
    assert s.watching.label_selectors.collect(jobs) == [SELECTOR]
    assert s.watching.label_selectors.collect(pods) == []  # the CRs and the peering stay unfiltered


def test_cluster_wide_operator_lists_and_watches_only_its_own_jobs():
    with ApiServer(REPO / "crds") as server:
        api = Api(server.url)
        for ns in ("team-a", "other"):
            _namespace(api, ns)
        for i in range(40):  # the cluster's other Jobs: none of them may reach the operator
            api.create(_job(f"foreign-{i}", {"app": "etl"}), "other")
        ours = owner_labels("Merge", "m") | {"branchmerge.dev/run": "0123456789abcdef"}
        api.create(_job("m-listed", ours), "team-a")
        # Every Jobs list/watch request without the selector is counted (a zero delay: served unchanged).
        server.faults.add_delay(0.0, method="GET", path_regex=UNSELECTED_JOBS, count=10**9)
        with OperatorThread(server.url, OperatorOptions(), clusterwide=True, metrics_port=None) as op:
            cache = op.operator.cache
            key = ("team-a", "Merge", "m")
            # the initial listing and the watch still deliver the operator's own Jobs
            wait_for(lambda: [j for j in cache.jobs_of(key) if j["metadata"]["name"] == "m-listed"], 30,
                     what="listed Job")
            api.create(_job("m-watched", ours), "team-a")
            api.create(_job("foreign-late", {"app": "etl"}), "team-a")
            wait_for(lambda: [j for j in cache.jobs_of(key) if j["metadata"]["name"] == "m-watched"], 30,
                     what="watched Job")
        audit = {(verb, group, resource) for _, verb, group, resource in server.audit}
        assert {("list", "batch", "jobs"), ("watch", "batch", "jobs")} <= audit
        assert server.faults.injected["delay"] == 0, "a list/watch of Jobs without the owned-Jobs label selector"


def test_unselected_jobs_pattern_matches_what_it_must():
    """The pattern above is what makes the previous test meaningful: check it on kopf-style URLs."""
    pattern = re.compile(UNSELECTED_JOBS)
    assert pattern.search("/apis/batch/v1/jobs?watch=true&allowWatchBookmarks=true")
    assert pattern.search("/apis/batch/v1/namespaces/a/jobs?limit=500")
    assert not pattern.search("/apis/batch/v1/jobs?labelSelector=app.kubernetes.io%2Fmanaged-by%3Dbranchmerge-operator")
    assert not pattern.search("/apis/batch/v1/jobs?watch=true&labelSelector=app.kubernetes.io/managed-by=branchmerge-operator")
    assert not pattern.search("/apis/batch/v1/namespaces/a/jobs/some-job")  # a get, not a list


@pytest.mark.parametrize("namespace", ["team-*", "team-?", "!kube-system", "team-a,team-b"])
def test_namespace_patterns_are_refused_at_start_up(tmp_path, namespace):
    """kopf with scanning disabled keeps only exact names: ``-n team-*`` used to start an operator that
    served nothing, silently. It must stop at once, saying why and what to use instead."""
    with ApiServer(REPO / "crds") as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        proc = subprocess.Popen(
            [sys.executable, "-m", "branchmerge.cli", "operator", "-n", "team-a", "-n", namespace,
             "--kubeconfig", str(kubeconfig), "--metrics-port", "0", "--liveness", ""],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"the operator started with --namespace {namespace!r} instead of refusing it")
    assert proc.returncode == 2
    assert f"--namespace {namespace!r}: namespace patterns are not supported" in err
    assert "--all-namespaces" in err and "team-a'" not in err  # only the pattern is named


def test_a_malformed_namespace_name_is_refused_too():
    from branchmerge.cli import main

    assert main(["operator", "-n", "Team_A"]) == 2  # returns before any login


def _stage_job(kind: str, spec: dict) -> dict:
    cr = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": kind,
          "metadata": {"name": "x", "namespace": "team-a", "uid": "uid-x", "generation": 1}, "spec": spec}
    run = target(cr, {}, OperatorOptions(hf_token_secret="hf"))
    assert not hasattr(run, "reason"), run
    job = build_job(run, 1, OperatorOptions(hf_token_secret="hf"))
    job["metadata"].pop("ownerReferences")  # no owner CR in this API server
    return job


MERGE = {"method": "linear", "models": [{"uri": "pvc://models/a"}, {"uri": "pvc://models/b"}],
         "output": {"uri": "pvc://models/merged"}}
SFT = {"base": {"uri": "hf://org/base@main"}, "data": [{"uri": "pvc://data/train.jsonl"}],
       "training": {"globalBatchSize": 8, "microBatchSize": 1}, "output": {"uri": "pvc://models/sft"}}


@pytest.mark.parametrize("kind, spec, qos", [
    ("Merge", MERGE, "Burstable"),  # no spec.resources: default requests, no longer BestEffort
    ("BranchSFT", {**SFT, "resources": {"nodes": 2, "gpusPerNode": 4}}, "Burstable"),
    ("BranchSFT", {**SFT, "resources": {"nodes": 2, "gpusPerNode": 4, "cpu": "16", "memory": "64Gi"}}, "Guaranteed"),
])
def test_stage_jobs_are_accepted_by_the_api_server_with_their_pod_details(kind, spec, qos):
    """The Job as built is valid for Kubernetes' own schema, goes through the stand-in's create pipeline (defaulting, validation) unchanged in
    what matters, and a pod of its template gets the QoS class the API server computes."""
    with ApiServer(REPO / "crds") as server:
        api = Api(server.url)
        _namespace(api, "team-a")
        job = _stage_job(kind, spec)
        for version in ("1.30.0", "1.37.0"):  # the supported range's OpenAPI schema, strict (unknown fields fail)
            kubernetes_validate.validate(job, version, strict=True)
        created = api.create(job, "team-a")
        template = created["spec"]["template"]["spec"]
        assert template["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
        for c in template["containers"] + template.get("initContainers", []):
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        dshm = next(v for v in template["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert dshm["medium"] == "Memory" and dshm["sizeLimit"]
        pod = api.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                          "spec": job["spec"]["template"]["spec"]}, "team-a")
        assert pod["status"]["qosClass"] == qos


def test_default_requests_are_operator_flags():
    from branchmerge.cli import build_parser, main
    from branchmerge.commands.operator import options_from_args

    def opts(*flags):
        return options_from_args(build_parser().parse_args(["operator", "-A", *flags]))

    assert (opts().default_cpu_request, opts().default_memory_request) == ("500m", "2Gi")
    given = opts("--default-cpu-request", "2", "--default-memory-request", "8Gi")
    assert (given.default_cpu_request, given.default_memory_request) == ("2", "8Gi")
    assert opts("--default-cpu-request", "none").default_cpu_request is None
    assert main(["operator", "-A", "--default-memory-request", "lots"]) == 2  # refused before any login


def test_chart_passes_default_requests_to_the_operator():
    from tests.deploy import chart as C

    from branchmerge.cli import build_parser
    from branchmerge.commands.operator import options_from_args

    def operator_args(values):
        (deployment,) = C.by_kind(C.render(values), "Deployment")
        return deployment["spec"]["template"]["spec"]["containers"][0]["args"]

    assert not [a for a in operator_args({}) if a.startswith("--default-")]  # the operator's own defaults
    args = operator_args({"trainer": {"defaultRequests": {"cpu": "2", "memory": "none"}}})
    assert "--default-cpu-request=2" in args and "--default-memory-request=none" in args
    opts = options_from_args(build_parser().parse_args(args))
    assert (opts.default_cpu_request, opts.default_memory_request) == ("2", None)
