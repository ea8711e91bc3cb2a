"""One launch profile per kind (operator/launch_profile.py), and both control planes reading it: the pods the
operator builds and the subprocesses the local runner starts agree on processes, stage and secrets."""
from __future__ import annotations

import sys

import pytest

from branchmerge.api.validation import parse_resource
from branchmerge.operator.launch_profile import StageVar, launch_profile
from branchmerge.operator.local.launch import EnvError, local_ranks, stage_command, stage_env
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import target
from branchmerge.operator.pods.job import build_job

from .kube_objects import EVAL_SPEC, MERGE_SPEC, SFT_SPEC, TG_SPEC, cr

OPTS = OperatorOptions(image="trainer:1")
SPECS = {"Merge": MERGE_SPEC, "BranchSFT": SFT_SPEC, "TeacherGen": TG_SPEC, "Eval": EVAL_SPEC}


def with_resources(kind: str, **resources) -> dict:
    return {**SPECS[kind], "resources": resources}


@pytest.mark.parametrize("kind, resources, launcher, nodes, procs", [
    ("Merge", {}, "process", 1, 1),
    ("Merge", {"nodes": 4, "gpusPerNode": 2}, "process", 1, 1),  # a merge never splits
    ("BranchSFT", {}, "process", 1, 1),
    ("BranchSFT", {"gpusPerNode": 1}, "process", 1, 1),
    ("BranchSFT", {"gpusPerNode": 8}, "torchrun", 1, 8),
    ("BranchSFT", {"nodes": 2}, "torchrun", 2, 1),  # CPU ranks: one per node
    ("BranchSFT", {"nodes": 2, "gpusPerNode": 4}, "torchrun", 2, 4),
    ("TeacherGen", {"gpusPerNode": 4}, "process", 1, 1),  # tensor parallel inside one process
    ("TeacherGen", {"nodes": 3, "gpusPerNode": 4}, "workers", 3, 1),
    ("Eval", {"nodes": 2}, "workers", 2, 1),
])
def test_each_kind_has_one_way_to_start(kind, resources, launcher, nodes, procs):
    profile = launch_profile(kind, with_resources(kind, **resources))
    assert (profile.launcher, profile.nodes, profile.procs_per_node) == (launcher, nodes, procs)
    assert profile.rendezvous == (launcher == "torchrun" and nodes > 1)


def test_a_kind_without_a_stage_has_no_profile():
    with pytest.raises(ValueError, match="no stage"):
        launch_profile("MergeSearch", {})


def test_secrets_are_named_once_in_spec_order():
    spec = {**EVAL_SPEC, "engine": {"name": "openai", "endpoint": {
        "baseUrl": "http://t:8000/v1", "model": "m", "apiKeySecretRef": {"name": "api", "key": "key"}}},
        "resources": {"env": [{"name": "PLAIN", "value": "1"},
                              {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}}
    assert launch_profile("Eval", spec).env == (StageVar("BRANCHMERGE_API_KEY", secret=("api", "key")),
                                                StageVar("PLAIN", value="1"), StageVar("TOKEN", secret=("s", "k")))
    teacher = {**TG_SPEC, "teacher": {**TG_SPEC["teacher"], "engine": {"name": "openai", "endpoint": {
        "baseUrl": "http://t:8000/v1", "model": "m", "apiKeySecretRef": {"name": "tk", "key": "v"}}}}}
    assert launch_profile("TeacherGen", teacher).env == (StageVar("BRANCHMERGE_API_KEY", secret=("tk", "v")),)


@pytest.mark.parametrize("kind, resources", [
    ("Merge", {}), ("BranchSFT", {"nodes": 2, "gpusPerNode": 4}), ("BranchSFT", {"nodes": 2}),
    ("TeacherGen", {"nodes": 3}), ("Eval", {"gpusPerNode": 1}),
])
def test_both_planes_start_the_same_stage_over_the_same_processes(kind, resources, tmp_path):
    spec = with_resources(kind, **resources)
    run = target(cr(kind, "x", spec), {}, OPTS)
    job = build_job(run, 1, OPTS)
    main = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in main["env"]}
    per_pod = int(env["PET_NPROC_PER_NODE"]) if main["command"][0] == "torchrun" else 1
    cluster = job["spec"]["completions"] * per_pod

    resource = parse_resource(cr(kind, "x", spec))
    wanted = local_ranks(resource, cores=1024)  # a machine big enough for any of these
    argv, ranks = stage_command(resource, tmp_path / "s.yaml", tmp_path / "r.json", wanted)
    local = ranks if "torch.distributed.run" in argv else 1
    # data-parallel workers collapse to one local process; everything else matches rank for rank
    assert local == (1 if run.profile.launcher == "workers" else cluster)
    stage = main["command"][main["command"].index("branchmerge") + 1:]
    assert argv[argv.index("branchmerge.cli") + 1:][:2] == stage[:2] == ["stage", run.profile.stage]


def test_a_secret_is_a_secret_key_on_the_cluster_and_the_runners_variable_locally(tmp_path, monkeypatch):
    spec = with_resources("Merge", env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}])
    main = build_job(target(cr("Merge", "x", spec), {}, OPTS), 1, OPTS)["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}} in main["env"]

    resource = parse_resource(cr("Merge", "x", spec))
    monkeypatch.delenv("TOKEN", raising=False)
    with pytest.raises(EnvError, match="export TOKEN"):
        stage_env(resource, tmp_path / "p.jsonl", threads=1)
    monkeypatch.setenv("TOKEN", "from-the-shell")
    assert stage_env(resource, tmp_path / "p.jsonl", threads=1)["TOKEN"] == "from-the-shell"


def test_the_local_launcher_runs_torchrun_as_a_command_not_an_import(tmp_path):
    resource = parse_resource(cr("BranchSFT", "x", with_resources("BranchSFT", nodes=2)))
    argv, ranks = stage_command(resource, tmp_path / "s.yaml", tmp_path / "r.json", 2)
    assert ranks == 2 and argv[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc-per-node", "2"]
    assert argv[6:] == ["-m", "branchmerge.cli", "stage", "sft", "--spec", str(tmp_path / "s.yaml"),
                        "--result", str(tmp_path / "r.json")]
