"""MergeSearch on Kubernetes: the operator's thin driver around operator/searchplan.py.

A reconcile reads the search's children from the watch-fed cache (Merge and Eval CRs labelled with the
search's name and controlled by its uid), replays the search over them, creates the children it asks for
as owned CRs (ownerReferences: garbage-collected with the search, listed by ``kubectl get branchmerge``),
and writes the status: phase, trials done/total, the leaderboard, the winner's output, and the
SelectionOnTestData warning (also an Event) when a downstream Eval scores the winner on the search's own
development data. The children are ordinary Merges and Evals: the operator runs them like any other.
"""
from __future__ import annotations

import asyncio
import copy
import logging
from typing import TYPE_CHECKING

from ..api import conditions as cond
from ..api.common import API_VERSION, TERMINAL
from ..api.labels import LABEL_SEARCH
from .naming import owned_by
from .plan import status_changed
from .policy import effective_phase
from .search import SpaceError
from .searchplan import SELECTION_ON_TEST, Child, expand, selection_on_test, warn_selection_on_test

if TYPE_CHECKING:
    from .controller import Operator

log = logging.getLogger("branchmerge.operator")
CHILD_KINDS = ("Merge", "Eval")


def search_of(child: dict | None) -> str | None:
    """The name of the MergeSearch a child CR belongs to (its label), if any."""
    if not child or child.get("kind") not in CHILD_KINDS:
        return None
    return ((child.get("metadata") or {}).get("labels") or {}).get(LABEL_SEARCH)


def observed_children(crs: dict, namespace: str, name: str, uid: str | None) -> dict[str, Child]:
    out = {}
    for (ns, kind, child_name), obj in crs.items():
        if ns != namespace or kind not in CHILD_KINDS or search_of(obj) != name or not owned_by(obj, uid):
            continue
        status = obj.get("status") or {}
        ready = cond.get_condition(status, "Ready") or {}
        out[f"{kind}/{child_name}"] = Child(phase=effective_phase(status), metrics=status.get("metrics") or {},
                                            output=status.get("output") or {}, message=ready.get("message", ""),
                                            cost=status.get("cost"))
    return out


def owned(doc: dict, cr: dict, namespace: str) -> dict:
    """A child manifest as the operator creates it: in the search's namespace, controlled by the search."""
    meta = cr["metadata"]
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    doc["metadata"]["ownerReferences"] = [{"apiVersion": API_VERSION, "kind": "MergeSearch", "name": meta["name"],
                                           "uid": meta.get("uid"), "controller": True, "blockOwnerDeletion": True}]
    return doc


def next_status(cr: dict, expansion_status: dict | None, error: str | None, warnings: list[str]) -> dict:
    """The new status from the old one (conditions keep their transition times)."""
    generation = cr["metadata"].get("generation")
    status = copy.deepcopy(cr.get("status") or {})
    if error is not None:
        cond.set_phase(status, "Failed", cond.INVALID_SPEC, error, generation)
    else:
        assert expansion_status is not None
        ready = cond.get_condition(expansion_status, "Ready") or {}
        for field in ("metrics", "output", "progress", "cost"):
            if field in expansion_status:
                status[field] = expansion_status[field]
        cond.set_phase(status, expansion_status["phase"], ready.get("reason", ""), ready.get("message", ""),
                       generation)
    warn_selection_on_test(status, warnings, generation)
    return status


async def reconcile_search(op: "Operator", key, cr: dict) -> None:
    namespace, kind, name = key
    meta = cr["metadata"]
    uid = meta.get("uid")
    warnings = selection_on_test(name, cr.get("spec") or {}, op.cache.namespace_crs(namespace))
    try:
        if not (cr.get("spec") or {}).get("outputRoot") and not op.opts.default_output_root:
            raise SpaceError("spec.outputRoot", "required (the operator has no --default-output-root for the "
                                                "trials' Merges and Evals)")
        # in a thread: a tpe replay builds Optuna studies (CPU), the event loop must keep serving watches
        expansion = await asyncio.to_thread(expand, name, cr.get("spec") or {},
                                            observed_children(op.cache.crs, namespace, name, uid),
                                            meta.get("generation"))
        error = None
    except SpaceError as err:  # the CRD's CEL accepts it but the search cannot run it: say which field
        expansion, error = None, str(err)
    if not op.leadership.leading.is_set():
        op._enqueue(key)
        return
    for doc in expansion.create if expansion else []:
        created, fresh = await op.client.create(owned(doc, cr, namespace))
        if fresh and created is not None:
            created.setdefault("kind", doc["kind"])
            created.setdefault("apiVersion", API_VERSION)
            op.cache.put_cr(created)  # seen at once: the next reconcile must not count it missing
            op._enqueue((namespace, doc["kind"], doc["metadata"]["name"]))
    old = cr.get("status") or {}
    new = next_status(cr, expansion.status if expansion else None, error, warnings)
    changes = status_changed(old, new)
    if not changes:
        return
    patched = await op.client.patch(kind, namespace, name, {"status": changes}, sub="status")
    if patched is None:
        return
    op.cache.put_cr(patched)
    op.metrics.observe_cr(patched)
    was = (cond.get_condition(old, SELECTION_ON_TEST) or {}).get("status")
    if warnings and was != "True":
        await op.client.event(cr, "Warning", SELECTION_ON_TEST, "; ".join(warnings)[:1024])
    if effective_phase(old) != effective_phase(new):
        op._wake_downstreams(key)
        if new.get("phase") in TERMINAL:
            ready = cond.get_condition(new, "Ready") or {}
            await op.client.event(cr, "Normal" if new["phase"] == "Succeeded" else "Warning",
                                  ready.get("reason", new["phase"]), ready.get("message", "")[:1024])
