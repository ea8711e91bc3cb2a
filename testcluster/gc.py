"""Asynchronous garbage collection, as kube-controller-manager's garbage collector and namespace controller
do it, running beside the API server stand-in (on its loop, acting on its store through the same delete
and update paths as requests, so finalizers, graceful pod deletion and watch events behave as for any
client).

A pass runs ``delay`` seconds after a relevant change (a deletion, a change of ownerReferences, finalizers
or deletionTimestamp) and at least every ``interval`` seconds, and does:

- orphan: an owner being deleted with the ``orphan`` finalizer gets its ownerReference removed from every
  dependent, then loses the finalizer (and goes, if nothing else holds it);
- foreground: an owner being deleted with ``foregroundDeletion`` has its dependents deleted (in the
  foreground themselves when they have dependents); once no dependent with ``blockOwnerDeletion: true``
  exists any more, the finalizer is removed;
- dangling owners: an object whose owners are all absent — deleted, never existed, or re-created under the
  same name with another uid — is deleted (Background, or as its own orphan/foregroundDeletion finalizer
  says); when only some owners are absent, the dangling references are removed;
- namespaces: a Terminating namespace has all its content deleted, then its ``kubernetes`` finalizer is
  removed, which deletes it.

One pass handles one level of a cascade; the deletions it makes trigger the next pass, so a chain of
owners is collected over a few passes, like the real controller's work queues.

Not emulated: the GC's discovery-driven resync and its graph's uid cache, events it records on objects,
``OwnerRefInvalidNamespace`` (cross-scope references are treated as absent owners), rate limits.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .statuses import StatusError
from .store import jcopy

if TYPE_CHECKING:
    from .core import Core
    from .resources import ResourceType
    from .store import Stored

log = logging.getLogger("testcluster.gc")


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0]


class GarbageCollector:
    def __init__(self, core: "Core", *, delay: float = 0.2, interval: float = 1.0):
        self.core = core
        self.delay = delay
        self.interval = interval
        self.passes = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="testcluster-gc")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(self.delay)
            self._wake.clear()
            try:
                self.collect()
            except Exception:  # keep collecting whatever one object did
                log.exception("garbage collection pass failed")

    # ---- one pass -------------------------------------------------------------------------------------------

    def _types(self) -> list["ResourceType"]:
        """One served type per storage (events.k8s.io shares core Events' storage)."""
        seen, out = set(), []
        for rt in self.core.types.values():
            if rt.storage_key not in seen and rt.storage_key in self.core.storages:
                seen.add(rt.storage_key)
                out.append(rt)
        return out

    def _snapshot(self):
        items = []
        for rt in self._types():
            for stored in list(self.core.storage(rt).objects.values()):
                items.append((rt, stored, self.core.view(rt, stored)))
        return items

    def collect(self) -> None:
        self.passes += 1
        items = self._snapshot()
        by_uid = {obj["metadata"].get("uid"): (rt, obj) for rt, _, obj in items}
        dependents: dict[str, list] = {}
        for rt, stored, obj in items:
            for ref in obj["metadata"].get("ownerReferences") or []:
                dependents.setdefault(ref.get("uid"), []).append((rt, stored, obj, ref))
        for rt, stored, obj in items:
            meta = obj["metadata"]
            if meta.get("deletionTimestamp"):
                fins = meta.get("finalizers") or []
                if "orphan" in fins:
                    self._orphan(rt, obj, dependents.get(meta.get("uid"), []))
                elif "foregroundDeletion" in fins:
                    self._foreground(rt, obj, dependents)
                if rt.plural == "namespaces" and not rt.group:
                    self._namespace(rt, obj)
                continue
            refs = meta.get("ownerReferences") or []
            if refs:
                self._check_owners(rt, obj, refs, by_uid)

    def _live(self, rt: "ResourceType", obj: dict) -> "Stored | None":
        meta = obj["metadata"]
        stored = self.core.storage(rt).objects.get((meta.get("namespace") or "", meta["name"]))
        if stored is None or stored.raw["metadata"].get("uid") != meta.get("uid"):
            return None
        return stored

    def _update(self, rt: "ResourceType", obj: dict, mutate) -> None:

        stored = self._live(rt, obj)
        if stored is None:
            return
        new = jcopy(self.core.view(rt, stored))
        mutate(new["metadata"])
        try:
            self.core._update(rt, stored, new, None, {}, None)
        except StatusError as err:
            log.warning("gc could not update %s %s: %s", rt.plural, obj["metadata"]["name"], err.message)

    def _delete(self, rt: "ResourceType", obj: dict, propagation: str) -> None:

        meta = obj["metadata"]
        if self._live(rt, obj) is None:
            return
        try:
            self.core.delete(rt, meta.get("namespace"), meta["name"], {
                "propagationPolicy": propagation, "preconditions": {"uid": meta.get("uid")}})
        except StatusError as err:
            if err.code not in (404, 409):
                log.warning("gc could not delete %s %s: %s", rt.plural, meta["name"], err.message)

    @staticmethod
    def _drop_finalizer(name: str):
        def mutate(meta: dict) -> None:
            meta["finalizers"] = [f for f in meta.get("finalizers") or [] if f != name]
            if not meta["finalizers"]:
                del meta["finalizers"]
        return mutate

    def _orphan(self, rt, owner: dict, deps: list) -> None:
        uid = owner["metadata"].get("uid")
        for drt, _, dobj, _ in deps:
            def strip(meta: dict, uid=uid) -> None:
                refs = [r for r in meta.get("ownerReferences") or [] if r.get("uid") != uid]
                if refs:
                    meta["ownerReferences"] = refs
                else:
                    meta.pop("ownerReferences", None)
            self._update(drt, dobj, strip)
        self._update(rt, owner, self._drop_finalizer("orphan"))

    def _foreground(self, rt, owner: dict, dependents: dict) -> None:
        uid = owner["metadata"].get("uid")
        blocking = False
        for drt, _, dobj, ref in dependents.get(uid, []):
            if self._live(drt, dobj) is None:
                continue
            if not dobj["metadata"].get("deletionTimestamp"):
                has_own = bool(dependents.get(dobj["metadata"].get("uid")))
                self._delete(drt, dobj, "Foreground" if has_own else "Background")
            if ref.get("blockOwnerDeletion") and self._live(drt, dobj) is not None:
                blocking = True
        if not blocking:
            self._update(rt, owner, self._drop_finalizer("foregroundDeletion"))

    def _check_owners(self, rt, obj: dict, refs: list, by_uid: dict) -> None:
        solid, dangling, waiting = [], [], []
        ns = obj["metadata"].get("namespace")
        for ref in refs:
            found = by_uid.get(ref.get("uid"))
            if found is None:
                if (ref.get("apiVersion"), ref.get("kind")) not in self.core.by_kind and not any(
                        t.kind == ref.get("kind") and t.group == _group(ref.get("apiVersion", ""))
                        for t in self.core.types.values()):
                    return  # an owner kind this cluster does not serve: the real GC cannot resolve it either
                dangling.append(ref)
                continue
            ort, owner = found
            ometa = owner["metadata"]
            if (ort.kind != ref.get("kind") or ort.group != _group(ref.get("apiVersion", ""))
                    or ometa.get("name") != ref.get("name") or (ort.namespaced and ometa.get("namespace") != ns)):
                dangling.append(ref)
            elif ometa.get("deletionTimestamp") and "foregroundDeletion" in (ometa.get("finalizers") or []):
                waiting.append(ref)
            else:
                solid.append(ref)
        if not dangling:
            return
        if not solid and not waiting:
            fins = obj["metadata"].get("finalizers") or []
            policy = "Orphan" if "orphan" in fins else "Foreground" if "foregroundDeletion" in fins else "Background"
            self._delete(rt, obj, policy)
            return
        gone = {r.get("uid") for r in dangling}

        def strip(meta: dict) -> None:
            meta["ownerReferences"] = [r for r in meta.get("ownerReferences") or [] if r.get("uid") not in gone]
        self._update(rt, obj, strip)

    def _namespace(self, rt, ns_obj: dict) -> None:
        name = ns_obj["metadata"]["name"]
        remaining = 0
        for t in self._types():
            if not t.namespaced:
                continue
            for stored in list(self.core.storage(t).objects.values()):
                obj = self.core.view(t, stored)
                if obj["metadata"].get("namespace") != name:
                    continue
                remaining += 1
                if not obj["metadata"].get("deletionTimestamp"):
                    self._delete(t, obj, "Background")
        if remaining:
            return

        stored = self._live(rt, ns_obj)
        if stored is None:
            return
        body = jcopy(self.core.view(rt, stored))
        body.setdefault("spec", {})["finalizers"] = [f for f in body["spec"].get("finalizers") or []
                                                     if f != "kubernetes"]
        try:
            self.core._update(rt, stored, body, "finalize", {}, None)
        except StatusError as err:
            log.warning("namespace controller could not finalize %s: %s", name, err.message)
