"""The Argo CD health check (deploy/argocd/health.lua) executed with a Lua 5.1 interpreter (Argo CD's
gopher-lua is 5.1) against statuses produced by the operator's own condition helpers."""
from __future__ import annotations

import copy

import pytest
from lupa import lua51

from branchmerge.api import conditions as C
from branchmerge.api.resources import KIND_INFO

from .helpers import HEALTH_LUA

KINDS = tuple(KIND_INFO)  # every kind shares the operator's status contract


def run_health(obj: dict) -> dict:
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(HEALTH_LUA.read_text(encoding="utf-8"))
    return {"status": result["status"], "message": result["message"]}


def cr(kind: str, generation: int = 1, status: dict | None = None, suspend: bool = False) -> dict:
    obj = {
        "apiVersion": "branchmerge.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "team-a", "generation": generation},
        "spec": {"resources": {"suspend": suspend}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def status_for(phase: str, reason: str, message: str = "", generation: int = 1) -> dict:
    return C.set_phase({}, phase, reason, message, generation=generation)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("phase", "reason", "expected"),
    [
        ("Pending", C.CREATED, "Progressing"),
        ("Waiting", C.UPSTREAM_NOT_READY, "Progressing"),
        ("Waiting", C.UPSTREAM_NOT_FOUND, "Progressing"),
        ("Running", C.RUNNING, "Progressing"),
        ("Running", C.RETRYING, "Progressing"),
        ("Succeeded", C.SUCCEEDED, "Healthy"),
        ("Succeeded", C.CACHED, "Healthy"),
        ("Failed", C.FAILED, "Degraded"),
        ("Failed", C.UPSTREAM_FAILED, "Degraded"),
        ("Failed", C.BACKOFF_LIMIT_EXCEEDED, "Degraded"),
        ("Failed", C.INVALID_SPEC, "Degraded"),
        ("Suspended", C.SUSPENDED, "Suspended"),
    ],
)
def test_phase_maps_to_health(kind, phase, reason, expected):
    health = run_health(cr(kind, status=status_for(phase, reason, "details here")))
    assert health["status"] == expected
    if expected in ("Progressing", "Degraded"):
        assert reason in health["message"]


def test_no_status_is_progressing():
    assert run_health(cr("Merge"))["status"] == "Progressing"
    assert run_health(cr("Merge", status={}))["status"] == "Progressing"


def test_ready_but_stale_generation_is_not_healthy():
    obj = cr("BranchSFT", generation=3, status=status_for("Succeeded", C.SUCCEEDED, generation=2))
    health = run_health(obj)
    assert health["status"] == "Progressing"
    assert "generation 3" in health["message"] and "observed 2" in health["message"]


def test_missing_observed_generation_is_not_healthy():
    status = status_for("Succeeded", C.SUCCEEDED)
    del status["observedGeneration"]
    assert run_health(cr("Eval", status=status))["status"] == "Progressing"


def test_stalled_condition_degrades_even_before_phase_failed():
    status = status_for("Waiting", C.UPSTREAM_NOT_READY)
    C.set_condition(status, "Stalled", True, C.UPSTREAM_FAILED, "TeacherGen/math failed", generation=1)
    health = run_health(cr("BranchSFT", status=status))
    assert health["status"] == "Degraded"
    assert health["message"] == "UpstreamFailed: TeacherGen/math failed"


def test_suspend_requested_in_spec_is_suspended_until_finished():
    running = status_for("Running", C.RUNNING)
    assert run_health(cr("TeacherGen", status=running, suspend=True))["status"] == "Suspended"
    done = status_for("Succeeded", C.SUCCEEDED)
    assert run_health(cr("TeacherGen", status=done, suspend=True))["status"] == "Healthy"
    failed = status_for("Failed", C.FAILED, "exit code 2")
    assert run_health(cr("TeacherGen", status=failed, suspend=True))["status"] == "Degraded"


def test_progress_message_is_shown():
    status = status_for("Running", C.RUNNING)
    status["progress"] = {"fraction": 0.5, "message": "step 50/100"}
    health = run_health(cr("BranchSFT", status=status))
    assert health == {"status": "Progressing", "message": "Running (Running): step 50/100"}


def test_generations_as_floats_compare_equal():
    # Argo CD decodes JSON numbers as float64; the check must not depend on int vs float.
    obj = cr("Merge", generation=2, status=status_for("Succeeded", C.SUCCEEDED, generation=2))
    obj["metadata"]["generation"] = 2.0
    assert run_health(copy.deepcopy(obj))["status"] == "Healthy"


@pytest.mark.parametrize(
    ("phase", "kstatus"),
    [("Pending", "InProgress"), ("Waiting", "InProgress"), ("Running", "InProgress"),
     ("Succeeded", "Current"), ("Failed", "Failed")],
)
def test_conditions_read_the_same_under_flux_kstatus(phase, kstatus):
    """kstatus (Flux's health): Reconciling=True -> InProgress, Stalled=True -> Failed, else Current once
    observedGeneration matches. The operator's conditions must agree with the Argo CD reading."""
    status = status_for(phase, "R")
    reconciling = C.get_condition(status, "Reconciling")["status"] == "True"
    stalled = C.get_condition(status, "Stalled")["status"] == "True"
    observed = status["observedGeneration"] == 1
    computed = "Failed" if stalled else "InProgress" if (reconciling or not observed) else "Current"
    assert computed == kstatus
    argo = run_health(cr("Eval", status=status))["status"]
    assert {"InProgress": "Progressing", "Current": "Healthy", "Failed": "Degraded"}[kstatus] == argo
