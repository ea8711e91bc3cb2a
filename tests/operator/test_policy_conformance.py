"""One table, both control planes: the same sequences of stage outcomes give the same phases, reasons,
Stalled condition and attempt counts under the kopf operator's decisions (operator/plan.py, fed Jobs and
pods as the API server shows them) and under the local runner (operator/local/runner.py, running real
processes). The rules themselves are operator/policy.py's.

The local side runs the runner as `branchmerge run` does, with one stand-in: each stage's command is a
small script that exits with the scripted code of its attempt (and writes the result file a stage writes:
a published output on success, the stage's exit class on failure). It does not emulate a stage's work,
progress events or timing. The operator side is plan() in a loop, as controller.reconcile drives it, with
Jobs finished and pods terminated as the Job controller and kubelet report them.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from branchmerge.api import conditions as C
from branchmerge.api.manifests import load
from branchmerge.api.timefmt import format_time
from branchmerge.operator.local import runner as local_runner
from branchmerge.operator.local.runner import RunOptions, Runner
from branchmerge.operator.local.status_files import StatusFiles
from branchmerge.operator.local.workdir import Workdir
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import Observed, plan, upstream_view

from .kube_objects import cr, finish_job, pod

OPTS = OperatorOptions()


@dataclass
class Row:
    name: str
    codes: dict[str, list]  # stage -> exit code per attempt; (1, 2): exit 1, the stage's report says 2
    expected: dict[str, tuple]  # stage -> (phase, Ready reason, Stalled, attempts)
    policy: dict = field(default_factory=lambda: {"backoffLimit": 2, "backoffSeconds": 0})
    chain: tuple[str, ...] = ("a",)  # each stage takes the previous one's output
    suspend: tuple[str, ...] = ()
    transitions: list | None = None  # (phase, reason) sequence of stage "a", when checked


TABLE = [
    Row("succeeds", {"a": [0]}, {"a": ("Succeeded", C.SUCCEEDED, False, 1)},
        transitions=[("Running", C.STARTED), ("Succeeded", C.SUCCEEDED)]),
    Row("retried then succeeds", {"a": [3, 0]}, {"a": ("Succeeded", C.SUCCEEDED, False, 2)}),
    Row("waits for its backoff as Retrying", {"a": [3, 0]}, {"a": ("Succeeded", C.SUCCEEDED, False, 2)},
        policy={"backoffLimit": 1, "backoffSeconds": 1},
        transitions=[("Running", C.STARTED), ("Running", C.RETRYING), ("Running", C.STARTED),
                     ("Succeeded", C.SUCCEEDED)]),
    Row("invalid input is permanent", {"a": [2]}, {"a": ("Failed", C.INVALID_SPEC, True, 1)}),
    Row("retries run out", {"a": [3, 3, 3]}, {"a": ("Failed", C.BACKOFF_LIMIT_EXCEEDED, True, 3)}),
    Row("a signal with no retries left", {"a": [137]}, {"a": ("Failed", C.BACKOFF_LIMIT_EXCEEDED, True, 1)},
        policy={"backoffLimit": 0, "backoffSeconds": 0}),
    Row("the stage's class survives torchrun's exit 1", {"a": [(1, 2)]}, {"a": ("Failed", C.INVALID_SPEC, True, 1)}),
    Row("a failed upstream stalls every stage below it", {"a": [2], "b": [], "c": []},
        {"a": ("Failed", C.INVALID_SPEC, True, 1), "b": ("Waiting", C.UPSTREAM_FAILED, True, 0),
         "c": ("Waiting", C.UPSTREAM_FAILED, True, 0)}, chain=("a", "b", "c")),
    # attempts not compared (None): on Kubernetes a suspended stage already has its attempt-1 Job, created
    # suspended so that a queue (Kueue) can admit it; locally nothing exists until it runs
    Row("suspended", {"a": []}, {"a": ("Suspended", C.SUSPENDED, False, None)}, suspend=("a",)),
]


def _spec(row: Row, name: str, uri_of) -> dict:
    i = row.chain.index(name)
    first = {"uri": uri_of("in")} if i == 0 else {"from": {"kind": "Merge", "name": row.chain[i - 1]}}
    spec = {"method": "linear", "models": [first, {"uri": uri_of("other")}], "output": {"uri": uri_of(f"out-{name}")},
            "runPolicy": dict(row.policy)}
    if name in row.suspend:
        spec["resources"] = {"suspend": True}
    return spec


def _summary(status: dict) -> tuple:
    stalled = (C.get_condition(status, "Stalled") or {}).get("status") == "True"
    return (status.get("phase"), (C.get_condition(status, "Ready") or {}).get("reason"), stalled,
            int(status.get("attempts") or 0))


def _comparable(states: dict, expected: dict) -> dict:
    return {n: state if expected[n][3] is not None else (*state[:3], None) for n, state in states.items()}


# ---- the operator ---------------------------------------------------------------------------------------------

def run_operator(row: Row) -> tuple[dict, list]:
    crs = {n: cr("Merge", n, _spec(row, n, lambda x: f"pvc://models/{x}")) for n in row.chain}
    jobs: dict[str, list[dict]] = {n: [] for n in row.chain}
    pods: dict[str, list[dict]] = {}
    configmaps: dict[str, dict] = {}
    outcomes = {n: list(row.codes[n]) for n in row.chain}
    transitions: list = []
    now = 1_000_000.0
    for _ in range(200):  # reconciles, as the controller's queue would run them
        changed = False
        for n in row.chain:
            doc = crs[n]
            upstreams = upstream_view([crs[u] for u in row.chain[:row.chain.index(n)]])
            cm = next(iter(configmaps.get(n, {}).values()), None)
            decided = plan(doc, upstreams, Observed(jobs=jobs[n], pods=pods, configmap=cm), OPTS, now)
            for obj in decided.create:
                if obj["kind"] == "Job":
                    jobs[n].append(obj)
                elif obj["kind"] == "ConfigMap":
                    configmaps.setdefault(n, {})[obj["metadata"]["name"]] = copy.deepcopy(obj)
            for kind, name, patch in decided.patch:
                if kind == "ConfigMap":
                    target = configmaps[n][name]
                    target["metadata"].setdefault("annotations", {}).update(patch["metadata"]["annotations"])
            before = _summary(doc.get("status") or {})
            if decided.status != (doc.get("status") or {}):
                doc["status"] = decided.status
                changed = True
                if n == "a" and _summary(decided.status)[:2] != before[:2]:
                    transitions.append(_summary(decided.status)[:2])
            # the Job controller and kubelet: the latest active attempt ends with its scripted outcome
            active = [j for j in jobs[n] if not (j.get("status") or {}).get("conditions")]
            if active and not (doc["spec"].get("resources") or {}).get("suspend"):
                job = active[-1]
                code = outcomes[n].pop(0)
                code, reported = code if isinstance(code, tuple) else (code, code)
                name = job["metadata"]["name"]
                message = {"phase": "Succeeded", "outputUri": doc["spec"]["output"]["uri"], "digest": "sha256:x"} \
                    if code == 0 else {"phase": "Failed", "error": f"exit {reported}", "exitCode": reported}
                pods[name] = [pod(name, exit_code=code, message=message)]
                jobs[n][jobs[n].index(job)] = finish_job(job, code == 0, when=format_time(now))
                changed = True
        if not changed:
            if any(outcomes.values()) or any(d.get("status", {}).get("phase") == "Running" for d in crs.values()):
                now += 1.0  # a backoff is running: time passes
                continue
            break
    return {n: _summary(crs[n].get("status") or {}) for n in row.chain}, transitions


# ---- the local runner -----------------------------------------------------------------------------------------

SCRIPTED_STAGE = r'''
import json, sys, pathlib
codes, counter, spec_file, result_file = json.loads(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
n = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(n + 1))
code, reported = codes[n] if isinstance(codes[n], list) else (codes[n], codes[n])
import yaml
out = yaml.safe_load(open(spec_file))["spec"]["output"]["uri"]
result = {"phase": "Failed", "error": f"exit {reported}", "exitCode": reported}
if code == 0:
    from branchmerge.api.outputs import combined_digest, read_manifest
    from branchmerge.api.uris import local_path
    from branchmerge.trainer.publish import atomic_folder
    with atomic_folder(local_path(out)) as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights")
    result = {"phase": "Succeeded", "outputUri": out, "digest": combined_digest(read_manifest(local_path(out)))}
pathlib.Path(result_file).write_text(json.dumps(result))
sys.exit(code)
'''


class Transitions:
    """A display that records what the runner shows (phase, reason) per stage."""

    def __init__(self):
        self.seen: dict[str, list] = {}

    def transition(self, key, phase, reason, message):
        self.seen.setdefault(key, []).append((phase, reason))

    def start(self, runner):
        pass

    def stop(self):
        pass

    def update(self, key, record):
        pass

    def progress(self, key, record, started):
        pass


def run_local(row: Row, tmp_path: Path, monkeypatch) -> tuple[dict, list]:
    root = tmp_path / "local"
    root.mkdir()
    docs = [{"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge", "metadata": {"name": n},
             "spec": _spec(row, n, lambda x: (root / x).as_uri())} for n in row.chain]
    (root / "m").mkdir()
    (root / "m" / "pipeline.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))

    def scripted(resource, spec_file, result_file, ranks):
        name = resource.name  # type: ignore[attr-defined]
        codes = [list(c) if isinstance(c, tuple) else c for c in row.codes[name]]
        return [sys.executable, "-c", SCRIPTED_STAGE, json.dumps(codes), str(root / f"{name}.attempts"),
                str(spec_file), str(result_file)], 1

    monkeypatch.setattr(local_runner, "stage_command", scripted)
    display = Transitions()
    Runner(load([root / "m"]), Workdir.at(root / "wd"), RunOptions(jobs=2), display).run()
    store = StatusFiles(Workdir.at(root / "wd"))
    states = {n: _summary(store.load(f"Merge/{n}")["status"]) for n in row.chain}
    return states, [t for t in display.seen.get("Merge/a", []) if t[0] != "Pending"]


@pytest.mark.parametrize("row", TABLE, ids=[r.name for r in TABLE])
def test_both_control_planes_agree(row, tmp_path, monkeypatch):
    operator_states, operator_transitions = run_operator(row)
    local_states, local_transitions = run_local(row, tmp_path, monkeypatch)
    assert _comparable(operator_states, row.expected) == row.expected, f"operator: {operator_states}"
    assert _comparable(local_states, row.expected) == row.expected, f"local runner: {local_states}"
    if row.transitions is not None:
        assert operator_transitions == row.transitions, f"operator: {operator_transitions}"
        assert local_transitions == row.transitions, f"local runner: {local_transitions}"
