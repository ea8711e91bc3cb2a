"""The operator's decisions, as pure functions of what it observed (plain dicts in, plain data out).

``target(cr, upstreams, opts)`` says what the CR should run: nothing yet (an upstream is missing, not
done or failed), nothing ever (invalid spec), or a ``Run`` (resolved manifest + run hash).
``plan(cr, upstreams, observed, opts, now)`` compares that with the children that exist and returns the
children to create, Jobs to patch or delete, the new status, the Events of the transition and when to
look again. The kopf handlers only feed it and apply its answer, so every decision is unit-testable.

Lifecycle decisions:
- A run is identified by the hash of its resolved spec without ``resources.suspend``,
  ``resources.queueName`` and ``runPolicy`` (those act on the running Job, they do not change what it
  computes). Editing anything else after the run started (a new generation with a new hash) supersedes
  it: the active Job of the old hash is deleted and attempt 1 of the new run starts; a finished run is
  re-run for the new spec. Specs are never mutated by the operator.
- A finished run stays finished when an upstream later re-runs or is deleted. A failed run is looked at
  again after any edit: raising ``runPolicy.backoffLimit`` after BackoffLimitExceeded resumes retrying.
- Finished means finished until the user acts: a terminal status for the current generation is kept even
  when the resolved spec hashes differently now -- a CRD upgrade that adds a defaulted field changes the
  spec every read returns without a new generation, and a new operator version may resolve differently.
  Only an edit (a new generation) or a new value of the ``branchmerge.dev/rerun`` annotation starts a new
  run; the value is part of the run hash and is recorded in the ``Rerun`` condition when its run starts,
  so each value runs once (removing the annotation later changes nothing).
- Children belong to the CR's uid, not its name: Jobs and ConfigMaps owned by another uid (a deleted CR of
  the same name whose children the garbage collector has not removed yet) are never used
  (``owned_children``); creating over one waits for the collector (``wait_for_cleanup``).
- Each attempt is one Job ``<cr>-<hash>-<attempt>``; the run's ConfigMap ``<cr>-<hash>`` holds the
  resolved spec and, once the run ends, its result (annotation): the durable record that survives Job
  TTL and operator restarts, so a finished run is never started again.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field

from pydantic import ValidationError

from ..api import finite as finite_json
from ..api import conditions as C
from ..api.common import TERMINAL
from ..api.cost import add_costs, clean_cost
from ..api.graph import references
from ..api.labels import ANNOTATION_RERUN, ANNOTATION_RESULT, LABEL_ATTEMPT, LABEL_RUN
from ..api.resources import KIND_INFO, CustomResource
from ..api.timefmt import format_time, parse_time
from ..api.validation import InvalidManifest, _schema_errors
from . import pending
from .pods.distributed import build_service
from .pods.job import build_children, build_job
from .pods.resources import GPU_RESOURCE, check_pod_settings
from .pods.run import Run, UnsupportedSpec
from .pods.staging import hf_secret_for, storage_needs
from .failures import (ACTIVE, FAILED, SUCCEEDED, SUSPENDED, _main_terminated, classify_failure, finished_at,
                       job_state, stage_result)
from .naming import owned_by
from .options import OperatorOptions
from .policy import Failure, after_failure, effective_phase, waiting
from .resolve import blockers, resolve, spec_hash

QUEUED = "Queued"  # Job created suspended, waiting for Kueue to admit it
# A child of a deleted CR of the same name is still there; the garbage collector will remove it.
WAITING_FOR_CLEANUP = "WaitingForGarbageCollection"
CLEANUP_POLL_SECONDS = 1.0
RERUN_CONDITION = "Rerun"  # message: the rerun annotation value the current run was started for


@dataclass
class Blocked:
    """Cannot start now; ``phase``/``reason``/``message`` say why."""

    phase: str
    reason: str
    message: str
    stalled: bool = False


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Observed:
    """Children of the CR as the operator sees them."""

    jobs: list[dict] = field(default_factory=list)
    pods: dict[str, list[dict]] = field(default_factory=dict)  # job name -> its pods (finished jobs only)
    configmap: dict | None = None  # the current run's ConfigMap, if it exists
    # the running attempt's pods while none is ready, and the Events about it and them (operator/pending.py)
    starting_pods: list[dict] | None = None
    job_events: list[dict] = field(default_factory=list)
    pod_events: list[dict] = field(default_factory=list)
    workload: dict | None = None  # Kueue's Workload of the running attempt's Job (queued runs only)


@dataclass
class Plan:
    status: dict
    create: list[dict] = field(default_factory=list)
    patch: list[tuple[str, str, dict]] = field(default_factory=list)  # (kind, name, merge patch)
    delete: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    run: Run | None = None
    finished: str | None = None  # "Succeeded"/"Failed" when this plan ends the run (for metrics)
    retried: str | None = None  # failure reason when this plan schedules/starts a retry


# ---- helpers ------------------------------------------------------------------------------------------

def run_hash(resolved: dict, rerun: str | None = None) -> str:
    """The run's identity. ``rerun``: the rerun annotation value it runs for (None: never asked)."""
    doc = copy.deepcopy(resolved)
    spec = doc["spec"]
    spec.pop("runPolicy", None)
    for key in ("suspend", "queueName"):
        spec.get("resources", {}).pop(key, None)
    if spec.get("resources") == {}:
        spec.pop("resources")
    if rerun is not None:  # only then: hashes of CRs that never asked for a rerun stay as they were
        doc["spec"] = {"spec": spec, "rerun": rerun}
    return spec_hash(doc)


# ---- cost ---------------------------------------------------------------------------------------------

def _pod_gpus(pod: dict) -> int:
    """GPUs the pod's containers hold (limit, else request: for extended resources they are equal)."""
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        res = container.get("resources") or {}
        amount = (res.get("limits") or {}).get(GPU_RESOURCE) or (res.get("requests") or {}).get(GPU_RESOURCE)
        try:
            total += int(amount or 0)
        except (TypeError, ValueError):
            pass
    return total


def attempt_cost(pods: list[dict]) -> dict | None:
    """One finished attempt's cost. What the cluster bills comes from the pods: GPUs requested x (container
    finish - start), summed over pods (a multi-node BranchSFT or a set of Eval workers has several), and the
    wall time from the first start to the last finish. CPU time and peak memory come from the stage's own
    report in the termination message (rank 0's process tree: pod 0)."""
    cost = dict(clean_cost((stage_result(pods) or {}).get("cost")) or {})
    spans, gpus, gpu_seconds = [], 0, 0.0
    for pod in pods:
        term = _main_terminated(pod) or {}
        start, end = parse_time(term.get("startedAt")), parse_time(term.get("finishedAt"))
        if not start or end is None or end < start:  # never started (a StartError's startedAt is the epoch)
            continue
        spans.append((start, end))
        gpus += _pod_gpus(pod)
        gpu_seconds += _pod_gpus(pod) * (end - start)
    if spans:
        cost.update(wallSeconds=round(max(e for _, e in spans) - min(s for s, _ in spans), 3), gpus=gpus,
                    gpuSeconds=round(gpu_seconds, 3))
    return {**cost, "attempts": 1} if cost else None


def cost_with_attempt(old: dict, attempt: int, pods: list[dict]) -> dict | None:
    """status.cost with the finished ``attempt`` added, once: ``cost.attempts`` says how many attempts the
    sums cover (attempts are numbered from 1 in a run), so a re-reconcile of the same finished attempt
    adds nothing. Retries cost money too: the run's cost is that of all its attempts."""
    cost = old.get("cost")
    if int((cost or {}).get("attempts") or 0) >= attempt:
        return cost
    return add_costs(cost, attempt_cost(pods) or {"attempts": 1})


# ---- reruns -------------------------------------------------------------------------------------------

def _token(value: str) -> str:
    """An annotation value as the Rerun condition records it (long values by digest)."""
    return value if len(value) <= 256 else "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def requested_rerun(cr: dict) -> str | None:
    """The rerun annotation's value, as recorded (None: no annotation)."""
    value = (cr.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_RERUN)
    return None if value is None else _token(str(value))


def recorded_rerun(status: dict) -> str | None:
    """The rerun value the current (or last) run was started for."""
    cond = C.get_condition(status, RERUN_CONDITION)
    return cond.get("message") if cond else None


def rerun_asked(cr: dict) -> bool:
    """Does the annotation carry a value no run has been started for yet?"""
    asked = requested_rerun(cr)
    return asked is not None and asked != recorded_rerun(cr.get("status") or {})


def effective_rerun(cr: dict) -> str | None:
    """The rerun value the run hash includes: a newly asked one, else the one the current run was started
    for (so removing the annotation later does not change the hash of the run it started)."""
    return requested_rerun(cr) if rerun_asked(cr) else recorded_rerun(cr.get("status") or {})


def finished_for_good(cr: dict) -> bool:
    """A run of this generation ended and nothing asks for another. (A Failed status without an attempt --
    rejected before any Job, e.g. InvalidSpec -- is looked at again: a new operator may accept it.)"""
    old = cr.get("status") or {}
    generation = cr.get("metadata", {}).get("generation")
    return (old.get("phase") in TERMINAL and old.get("observedGeneration") == generation
            and (old.get("phase") == "Succeeded" or int(old.get("attempts") or 0) > 0) and not rerun_asked(cr))


def _clean(cr: dict) -> dict:
    """The manifest part of a live object (server metadata would break parsing and hashing)."""
    meta = cr.get("metadata", {})
    clean_meta = {k: meta[k] for k in ("name", "namespace", "labels") if meta.get(k)}
    return {"apiVersion": cr.get("apiVersion"), "kind": cr.get("kind"), "metadata": clean_meta,
            "spec": cr.get("spec", {})}


def parse(cr: dict) -> CustomResource:
    """Schema validation only: the API server already enforced the CRD's CEL rules on admission, and
    evaluating them again here (cel-python, ~20 ms per CR) would dominate reconcile latency."""
    try:
        return KIND_INFO[cr["kind"]].model.model_validate(_clean(cr))
    except ValidationError as err:
        raise InvalidManifest(_schema_errors(err)) from None


def default_output(cr: dict, opts: OperatorOptions) -> str | None:
    if not opts.default_output_root:
        return None
    meta = cr["metadata"]
    return f"{opts.default_output_root.rstrip('/')}/{meta.get('namespace', 'default')}/{cr['kind'].lower()}/{meta['name']}"


def upstream_view(crs: list[dict]) -> dict[str, dict]:
    """Kind/name -> {phase, uri} of CRs in the namespace (what ``target`` needs of them)."""
    out = {}
    for cr in crs:
        status = cr.get("status") or {}
        out[f"{cr['kind']}/{cr['metadata']['name']}"] = {  # stalled by a failed upstream counts as failed
            "phase": effective_phase(status), "uri": (status.get("output") or {}).get("uri")}
    return out


def target(cr: dict, upstreams: dict[str, dict], opts: OperatorOptions) -> Run | Blocked:
    """What the CR should run now (a ``Run``) or why it cannot (``Blocked``)."""
    try:
        resource = parse(cr)
    except InvalidManifest as err:
        return Blocked("Failed", C.INVALID_SPEC, str(err)[:1024])
    phases = {key: up["phase"] for key, up in upstreams.items()}
    refs = references(resource)  # walks the whole spec: once per reconcile
    blocking = blockers(resource, phases, refs)
    if blocking:
        return Blocked(*waiting(blocking))
    outputs = {ref.key: upstreams[ref.key]["uri"] for ref in refs}
    missing = [key for key, uri in outputs.items() if not uri]
    if missing:
        return Blocked("Waiting", C.UPSTREAM_NOT_READY, f"{missing[0]} succeeded without an output URI")
    resolved = resolve(resource, outputs, default_output(cr, opts), refs)
    meta = cr["metadata"]
    run = Run(kind=cr["kind"], name=meta["name"], namespace=meta.get("namespace", "default"),
              uid=meta.get("uid", ""), run_hash=run_hash(resolved, effective_rerun(cr)), resolved=resolved,
              labels=dict(meta.get("labels") or {}), hf_secret=hf_secret_for(cr, opts))
    try:
        storage_needs(run)
        check_pod_settings(run.resources)
    except UnsupportedSpec as err:
        return Blocked("Failed", C.INVALID_SPEC, str(err))
    return run


# ---- status -------------------------------------------------------------------------------------------

def transition(old: dict, phase: str, reason: str, message: str, generation: int | None,
               stalled: bool = False) -> dict:
    status = copy.deepcopy(old)
    C.set_phase(status, phase, reason, message, generation)
    if stalled:  # an upstream failed: not terminal (it may be fixed), but no progress without a change
        C.set_condition(status, "Stalled", True, reason, message, generation)
        C.set_condition(status, "Reconciling", False, reason, "", generation)
    return status


def transition_events(old: dict, new: dict) -> list[Event]:
    """One Event per change of phase, Ready reason or attempt, with the same reason as the condition."""
    before = (old.get("phase"), (C.get_condition(old, "Ready") or {}).get("reason"), old.get("attempts"))
    ready = C.get_condition(new, "Ready") or {}
    after = (new.get("phase"), ready.get("reason"), new.get("attempts", old.get("attempts")))
    if before == after:
        return []
    warning = new.get("phase") == "Failed" or (C.get_condition(new, "Stalled") or {}).get("status") == "True" \
        or ready.get("reason") in pending.REASONS
    return [Event("Warning" if warning else "Normal", ready.get("reason", ""), ready.get("message", ""))]


def status_changed(old: dict, new: dict) -> dict:
    """Merge patch turning ``old`` into ``new`` (None deletes a field)."""
    patch = {}
    for key in set(old) | set(new):
        if old.get(key) != new.get(key):
            patch[key] = new.get(key)
    return patch


def _attempt(job: dict) -> int:
    try:
        return int(job["metadata"]["labels"][LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return 0


def recorded_result(configmap: dict | None) -> dict | None:
    """The final result a run's ConfigMap records (None: the run has not ended, or no ConfigMap)."""
    if not configmap:
        return None
    text = (configmap.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_RESULT)
    try:
        return finite_json.loads(text) if text else None
    except ValueError:
        return None


def _finish(plan: Plan, old: dict, run: Run, result: dict, generation: int | None, record: bool) -> Plan:
    """Terminal status from a run result; ``record`` also writes it to the run's ConfigMap."""
    if result["phase"] == "Succeeded":
        status = transition(old, "Succeeded", C.SUCCEEDED, f"attempt {result.get('attempt', 1)} succeeded",
                            generation)
        # The URI is the one the operator resolved and gave the stage, never what a pod says it wrote: a
        # downstream CR reads its input from here.
        status["output"] = {k: v for k, v in {"uri": run.spec["output"]["uri"],
                                               "digest": result.get("digest")}.items() if v}
        status["progress"] = {"fraction": 1.0, "message": "done"}
        status["metrics"] = {**(old.get("metrics") or {}), **(result.get("metrics") or {})}
    else:
        status = transition(old, "Failed", result.get("reason") or C.FAILED, result.get("message", ""), generation)
    status["attempts"] = result.get("attempt", old.get("attempts", 0))
    if result.get("cost"):
        status["cost"] = result["cost"]
    if result.get("completionTime"):  # the Job's own time, stable across restarts
        status["completionTime"] = result["completionTime"]
    plan.status = status
    if record:
        plan.patch.append(("ConfigMap", run.configmap_name,
                           {"metadata": {"annotations": {ANNOTATION_RESULT: json.dumps(result, sort_keys=True)}}}))
        plan.finished = result["phase"]
    return plan


# ---- the plan -----------------------------------------------------------------------------------------

def plan(cr: dict, upstreams: dict[str, dict], observed: Observed, opts: OperatorOptions, now: float,
         want: Run | Blocked | None = None) -> Plan:
    """``want`` is ``target(cr, upstreams, opts)`` when the caller computed it already."""
    old = cr.get("status") or {}
    generation = cr.get("metadata", {}).get("generation")
    if finished_for_good(cr):
        # Whatever the spec hashes to now (CRD defaults added since, another operator version): the run of
        # this generation is over. Its Jobs are finished; nothing to create, delete or write.
        return Plan(copy.deepcopy(old))
    want = want if want is not None else target(cr, upstreams, opts)
    if isinstance(want, Blocked):
        if want.phase == "Waiting" and old.get("phase") in TERMINAL and old.get("observedGeneration") == generation:
            # A finished run stays finished when an upstream later re-runs or is deleted (intermediate
            # CRs are often cleaned up); editing this CR starts a new run.
            return Plan(copy.deepcopy(old))
        status = transition(old, want.phase, want.reason, want.message, generation, want.stalled)
        return Plan(status, events=transition_events(old, status))
    out = _plan_run(cr, old, generation, want, observed, opts, now)
    asked = requested_rerun(cr)
    if asked is not None and asked != recorded_rerun(out.status):
        # This run is the one asked for (its hash includes the value): record that, once.
        C.set_condition(out.status, RERUN_CONDITION, True, "RerunRequested", asked, generation)
    return out


def owned_children(run: Run, observed: Observed) -> Observed:
    """The children that belong to this CR (its uid): a deleted CR of the same name left Jobs and a
    ConfigMap with the very names and labels of this one's until the garbage collector removes them."""
    mine = [j for j in observed.jobs if owned_by(j, run.uid)]
    configmap = observed.configmap if observed.configmap is None or owned_by(observed.configmap, run.uid) else None
    if len(mine) == len(observed.jobs) and configmap is observed.configmap:
        return observed
    pods = {name: p for name, p in observed.pods.items() if any(j["metadata"]["name"] == name for j in mine)}
    return Observed(jobs=mine, pods=pods, configmap=configmap)


def wait_for_cleanup(cr: dict, kind: str, name: str, owner_uid: str | None) -> Plan:
    """Creating ``kind``/``name`` met an object of that name owned by another uid: a deleted CR of the same
    name whose children the garbage collector has not removed yet. Never adopt it (its ConfigMap holds the
    old spec and result, and vanishes under our pods once collected): say so and look again shortly."""
    old = cr.get("status") or {}
    message = (f"{kind} {name} belongs to an earlier {cr['kind']} named {cr['metadata']['name']} "
               f"(uid {owner_uid}); waiting for the garbage collector to remove it before this one starts")
    status = transition(old, "Waiting", WAITING_FOR_CLEANUP, message, cr.get("metadata", {}).get("generation"))
    return Plan(status, events=transition_events(old, status), requeue_after=CLEANUP_POLL_SECONDS)


def _plan_run(cr: dict, old: dict, generation: int | None, run: Run, observed: Observed, opts: OperatorOptions,
              now: float) -> Plan:
    observed = owned_children(run, observed)
    out = Plan(copy.deepcopy(old), run=run)
    suspend = bool(run.resources.get("suspend"))

    # Active attempts of superseded runs (an edited spec) stop; finished ones are left to TTL/GC.
    for job in observed.jobs:
        labels = job.get("metadata", {}).get("labels") or {}
        if labels.get(LABEL_RUN) != run.run_hash and job_state(job) in (ACTIVE, SUSPENDED):
            out.delete.append(("Job", job["metadata"]["name"]))

    recorded = recorded_result(observed.configmap)
    if recorded is not None and recorded["phase"] == "Failed" and recorded.get("generation") != generation:
        recorded = None  # a failed run is looked at again after an edit (e.g. a higher backoffLimit)
    if recorded is not None:  # the run already ended (maybe before a restart, or its Jobs expired)
        _finish(out, old, run, recorded, generation, record=False)
        out.events = transition_events(old, out.status)
        return out

    mine = sorted((j for j in observed.jobs if (j.get("metadata", {}).get("labels") or {}).get(LABEL_RUN)
                   == run.run_hash), key=_attempt)
    latest = mine[-1] if mine else None
    attempt = _attempt(latest) if latest else 0

    if latest is None:
        # First attempt of this run. (status.attempts > 0 with no Job left means the Jobs expired or were
        # deleted mid-run: start again from the recorded attempt number so names never repeat. A rerun
        # asked for by annotation has a hash of its own: it starts at 1.)
        same_run = old.get("observedGeneration") == generation and not rerun_asked(cr)
        first = max(int(old.get("attempts", 0)) if same_run else 0, 0) + 1
        status = copy.deepcopy(old)
        for key in ("startTime", "completionTime", "output", "metrics", "progress"):
            status.pop(key, None)
        if not same_run:  # a new run: its cost starts at zero (attempts of the same run keep adding up)
            status.pop("cost", None)
        status["attempts"] = first
        phase, reason = ("Suspended", C.SUSPENDED) if suspend else ("Running", C.STARTED)
        status = transition(status, phase, reason, f"attempt {first} of run {run.run_hash} created", generation)
        out.create = build_children(run, first, opts, suspend=suspend)
        out.status = status
        out.events = transition_events(old, status)
        # A Job whose pods are refused (quota, admission) never changes: no event would bring it back here.
        out.requeue_after = None if suspend else opts.pending_recheck_seconds
        return out

    state = job_state(latest)
    name = latest["metadata"]["name"]
    if state in (ACTIVE, SUSPENDED):
        job_suspended = bool(latest.get("spec", {}).get("suspend"))
        if run.resources.get("queueName"):
            # Kueue owns Job.spec.suspend of the Jobs it queues (it unsuspends an admitted one again): its
            # documented stop is the Workload's spec.active=false (evicted, the Job suspended, not readmitted).
            workload = observed.workload
            active = ((workload or {}).get("spec") or {}).get("active", True) is not False
            if workload is not None and suspend == active:
                out.patch.append(("Workload", workload["metadata"]["name"], {"spec": {"active": not suspend}}))
            elif workload is None and suspend:
                out.requeue_after = opts.pending_recheck_seconds  # Kueue has not made the Workload yet
        elif suspend and not job_suspended:
            out.patch.append(("Job", name, {"spec": {"suspend": True}}))
            job_suspended = True
        elif not suspend and job_suspended:
            out.patch.append(("Job", name, {"spec": {"suspend": False}}))
            job_suspended = False
        if suspend:
            phase, reason, message = "Suspended", C.SUSPENDED, f"attempt {attempt} suspended"
        elif job_suspended:
            queue = run.resources.get("queueName")
            never = pending.over_capacity(observed.workload) if queue else None
            if never is not None:  # Kueue will never admit it: fail now, not at a deadline
                failure = Failure(False, never.reason, f"attempt {attempt} can never be admitted by queue {queue}: "
                                                       f"it {never.message}")
                return _give_up(out, old, run, latest, attempt, failure, generation, now)
            phase, reason, message = "Pending", QUEUED, f"attempt {attempt} waits for admission by queue {queue}"
            wait = pending.queue_wait(observed.workload) if queue else None
            if wait:
                message += f": {wait}"  # Kueue's words: what is missing; waiting in a queue has no deadline
            elif queue:  # Kueue has not looked at it yet: soon it says whether (and why not) it fits
                out.requeue_after = opts.pending_recheck_seconds
        else:
            phase, reason, why = _starting(out, latest, observed, opts)
            message = f"attempt {attempt} {why}"
            # The clock runs from when the Job may make pods: its startTime (set when it is unsuspended, reset
            # on resume), not its creation -- time spent queued in Kueue or suspended does not count.
            started = parse_time((latest.get("status") or {}).get("startTime")) or \
                parse_time((latest.get("metadata") or {}).get("creationTimestamp")) or now
            deadline = opts.pending_deadline_seconds
            if reason in pending.REASONS and deadline and now - started > deadline:
                # give up: the attempt's pods (or some of its gang) never started
                failure = Failure(False, reason, f"attempt {attempt} did not start within {deadline:.0f}s: "
                                                 f"{why.removeprefix('cannot start: ')}")
                return _give_up(out, old, run, latest, attempt, failure, generation, now)
        out.status = transition(old, phase, reason, message, generation)
        out.status["attempts"] = attempt
        out.events = transition_events(old, out.status)
        return out

    pods = observed.pods.get(name, [])
    if state == SUCCEEDED:
        result = stage_result(pods) or {}
        record = {"phase": "Succeeded", "attempt": attempt, "outputUri": result.get("outputUri"),
                  "digest": result.get("digest"), "metrics": result.get("metrics") or {},
                  "completionTime": finished_at(latest), "cost": cost_with_attempt(old, attempt, pods)}
        _finish(out, old, run, record, generation, record=True)
        out.events = transition_events(old, out.status)
        return out

    # The attempt failed: permanent, retry later, or retry now (operator/policy.py, as the local runner).
    failure = classify_failure(latest, pods)
    then = after_failure(failure, attempt, int(run.run_policy.get("backoffLimit", 3)),
                         float(run.run_policy.get("backoffSeconds", 30)), parse_time(finished_at(latest)) or now, now,
                         opts.max_backoff_seconds)
    if then.final:
        record = {"phase": "Failed", "attempt": attempt, "reason": then.reason, "message": then.message[:1024],
                  "exitCode": failure.exit_code, "completionTime": finished_at(latest), "generation": generation,
                  "cost": cost_with_attempt(old, attempt, pods)}
        _finish(out, old, run, record, generation, record=True)
        out.events = transition_events(old, out.status)
        return out
    # Counted once per failed attempt: when the wait starts (or at once when there is no wait).
    waiting_already = (C.get_condition(old, "Ready") or {}).get("reason") == C.RETRYING
    out.retried = None if waiting_already else failure.reason
    cost = cost_with_attempt(old, attempt, pods)
    if then.retry_at is not None:
        out.status = transition(old, then.phase, then.reason, then.message, generation)
        out.status["attempts"] = attempt
        if cost:
            out.status["cost"] = cost
        out.requeue_after = max(then.retry_at - now, 0.05)
        out.events = transition_events(old, out.status)
        return out
    out.create = ([build_service(run, attempt + 1)] if run.pods > 1 else []) + \
        [build_job(run, attempt + 1, opts, suspend=suspend)]
    out.status = transition(old, then.phase, then.reason, then.message, generation)
    out.status["attempts"] = attempt + 1
    if cost:
        out.status["cost"] = cost
    out.events = transition_events(old, out.status)
    out.requeue_after = None if suspend else opts.pending_recheck_seconds  # as for attempt 1
    return out


def _starting(out: Plan, latest: dict, observed: Observed, opts: OperatorOptions) -> tuple[str, str, str]:
    """(phase, reason, what it does) of an admitted attempt: running, starting, or held by a problem of its pods
    (operator/pending.py). A gang is held while any of its pods is: the running ones only wait in the
    rendezvous for the others (a partially placed multi-pod attempt would otherwise look Running until the
    rendezvous times out)."""
    pods = observed.starting_pods
    started = bool((latest.get("status") or {}).get("ready")) or pending.running(pods or [])
    if pods is not None:  # pods are not watched: look again until they all run
        out.requeue_after = opts.pending_recheck_seconds
    held = pending.problem(pods, observed.job_events, observed.pod_events) if pods is not None else None
    if held is not None and (not started or pending.stragglers(pods)):
        gang = f"{pending.started_count(pods)} of {len(pods)} pods running, the rest cannot start: " \
            if started else ""
        return "Running", held.reason, f"cannot start: {gang}{held.message}"
    if started:
        return "Running", C.RUNNING, "running"
    return "Running", C.STARTED, "starting"


def _give_up(out: Plan, old: dict, run: Run, job: dict, attempt: int, failure: Failure, generation: int | None,
             now: float) -> Plan:
    """End the run with a permanent failure of an attempt that never started (its Job is deleted, so its
    pods, or its place in Kueue's queue, go too), recorded in the run's ConfigMap: a restarted operator keeps
    the verdict, and only an edit of the spec (or a new rerun value) starts another run."""
    then = after_failure(failure, attempt, 0, 0.0, now, now)  # not retryable: Failed, whatever the backoff
    record = {"phase": "Failed", "attempt": attempt, "reason": then.reason, "message": then.message[:1024],
              "completionTime": format_time(now), "generation": generation}
    out.delete.append(("Job", job["metadata"]["name"]))
    _finish(out, old, run, record, generation, record=True)
    out.events = transition_events(old, out.status)
    out.requeue_after = None
    return out


def job_needing_pods(run: Run, jobs: list[dict]) -> str | None:
    """The finished latest attempt of ``run`` whose pods ``plan`` must see (result or failure cause)."""
    mine = [j for j in jobs if (j.get("metadata", {}).get("labels") or {}).get(LABEL_RUN) == run.run_hash]
    if not mine:
        return None
    latest = max(mine, key=_attempt)
    return latest["metadata"]["name"] if job_state(latest) in (SUCCEEDED, FAILED) else None

