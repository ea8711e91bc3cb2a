"""The operator's view of the cluster, fed by kopf's watch events: the four kinds and the Jobs the
operator owns. Reconciles read only from here (plus a few on-demand GETs), which keeps them cheap.

Two things a watch stream does not guarantee are handled here:
- a relist after 410 Gone replays no DELETED events: ``stale_crs``/``stale_jobs`` compare the cache with a
  fresh list, so the controller can drop what was deleted during the gap;
- a CR deleted and re-created under the same name has the same key and its children the same names: a
  late DELETED event of the old object must not remove the new one (``drop_*`` match the uid), and
  ``jobs_of`` returns only the Jobs the given CR uid owns.
"""
from __future__ import annotations

from ..api.graph import input_refs
from .naming import owned_by, owner_key_of
from .policy import effective_phase

Key = tuple[str, str, str]  # (namespace, kind, name)


def _rv(obj: dict) -> int | None:
    value = obj.get("metadata", {}).get("resourceVersion")
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _newer(new: dict, old: dict | None) -> bool:
    """Is ``new`` a version not seen yet? Watch events older than, or the echo of, what a write already put
    here are not (resourceVersions are etcd revisions in practice; if either is not numeric, trust it)."""
    if old is None:
        return True
    a, b = _rv(new), _rv(old)
    return a is None or b is None or a > b


def _uid(obj: dict | None) -> str | None:
    return (obj or {}).get("metadata", {}).get("uid")


def _same_object(stored: dict | None, gone: dict) -> bool:
    """Is a DELETED event about the object stored (not an older one of the same name)? Unknown uids match."""
    a, b = _uid(stored), _uid(gone)
    return stored is not None and (a is None or b is None or a == b)


def _listed_before(obj: dict, list_rv: int | None) -> bool:
    """Was ``obj`` stored at or before the list's resourceVersion (so the list would show it, were it
    still there)? A newer one came from a watch event or a write after the list: keep it. Unknown: keep."""
    rv = _rv(obj)
    return rv is not None and list_rv is not None and rv <= list_rv


def upstream_keys(spec) -> set[tuple[str, str]]:
    """(kind, name) of every ``from:`` in a raw spec (no parsing: this runs on every watch event)."""
    return {ref.upstream for ref in input_refs(spec) if ref.upstream}


class WatchCache:
    """Objects are stored as received (fresh JSON per watch event or API answer) and never mutated."""

    def __init__(self) -> None:
        self.crs: dict[Key, dict] = {}
        self.refs: dict[Key, set[tuple[str, str]]] = {}  # CR -> (kind, name) of its upstreams
        self.jobs: dict[Key, dict[str, dict]] = {}  # owner key -> job name -> job
        self.configmaps: dict[tuple[str, str], dict] = {}  # (namespace, name) -> run ConfigMap (cache)

    # ---- CRs ----
    def put_cr(self, body: dict) -> tuple[bool, bool]:
        """WatchCache a CR: (a version not seen before?, is it new or did its phase change -- downstreams care)."""
        meta = body["metadata"]
        key = (meta.get("namespace", ""), body["kind"], meta["name"])
        old = self.crs.get(key)
        if not _newer(body, old):
            return False, False
        self.crs[key] = body
        self.refs[key] = upstream_keys(body.get("spec"))
        # downstreams see the effective phase: a stall by a failed upstream reaches them too (operator/policy.py)
        return True, old is None or effective_phase(old.get("status")) != effective_phase(body.get("status"))

    def drop_cr(self, namespace: str, kind: str, name: str, uid: str | None = None) -> bool:
        """Forget a deleted CR; False when the stored one is another (newer) object of that name."""
        key = (namespace, kind, name)
        if uid is not None and key in self.crs and not _same_object(self.crs[key], {"metadata": {"uid": uid}}):
            return False
        self.crs.pop(key, None)
        self.refs.pop(key, None)
        for (ns, cm_name) in [k for k in self.configmaps if k[0] == namespace and
                              self.configmaps[k].get("metadata", {}).get("labels", {}).get(
                                  "branchmerge.dev/name") == name]:
            self.configmaps.pop((ns, cm_name), None)
        return True

    def stale_crs(self, namespace: str, kind: str, listed: dict[str, dict], list_rv: int | None) -> list[dict]:
        """Stored CRs of ``kind`` in ``namespace`` that a list at ``list_rv`` no longer has (or has as
        another object of the same name): deleted while the watch was down."""
        return [cr for (ns, k, name), cr in self.crs.items()
                if ns == namespace and k == kind and _listed_before(cr, list_rv)
                and (name not in listed or not _same_object(cr, listed[name]))]

    def namespace_crs(self, namespace: str) -> list[dict]:
        return [cr for (ns, _, _), cr in self.crs.items() if ns == namespace]

    def upstreams_of(self, key: Key) -> list[dict]:
        """The CRs ``key`` references that exist (a missing one is UpstreamNotFound)."""
        found = (self.crs.get((key[0], kind, name)) for kind, name in self.refs.get(key, ()))
        return [cr for cr in found if cr is not None]

    def downstreams(self, namespace: str, kind: str, name: str) -> list[Key]:
        return [key for key, ups in self.refs.items() if key[0] == namespace and (kind, name) in ups]

    # ---- Jobs ----
    def put_job(self, job: dict) -> Key | None:
        """WatchCache a Job the operator owns; its owner's key if this is a version not seen before."""
        owner = owner_key_of(job)
        if owner is None:
            return None
        kind, name = owner.split("/", 1)
        key = (job["metadata"].get("namespace", ""), kind, name)
        jobs = self.jobs.setdefault(key, {})
        if not _newer(job, jobs.get(job["metadata"]["name"])):
            return None
        jobs[job["metadata"]["name"]] = job
        return key

    def drop_job(self, job: dict) -> Key | None:
        owner = owner_key_of(job)
        if owner is None:
            return None
        kind, name = owner.split("/", 1)
        key = (job["metadata"].get("namespace", ""), kind, name)
        jobs = self.jobs.get(key, {})
        if not _same_object(jobs.get(job["metadata"]["name"]), job):
            return None  # not stored, or a new Job of that name (re-created CR) already replaced it
        jobs.pop(job["metadata"]["name"], None)
        return key

    def job_named(self, namespace: str, name: str) -> dict | None:
        """The stored Job of that name, whoever owns it (names are unique per namespace)."""
        for (ns, _, _), jobs in self.jobs.items():
            if ns == namespace and name in jobs:
                return jobs[name]
        return None

    def jobs_of(self, key: Key, uid: str | None = None) -> list[dict]:
        """The CR's Jobs; with ``uid``, only those that CR owns (not a deleted namesake's)."""
        return [j for j in self.jobs.get(key, {}).values() if owned_by(j, uid)]

    def stale_jobs(self, namespace: str, listed: dict[str, dict], list_rv: int | None) -> list[dict]:
        """Stored Jobs in ``namespace`` that a list at ``list_rv`` no longer has (see ``stale_crs``)."""
        return [job for (ns, _, _), jobs in self.jobs.items() if ns == namespace for name, job in jobs.items()
                if _listed_before(job, list_rv) and (name not in listed or not _same_object(job, listed[name]))]

    def namespaces(self) -> set[str]:
        """Namespaces the cache holds anything of (what a resync must list)."""
        return {key[0] for key in self.crs} | {key[0] for key, jobs in self.jobs.items() if jobs}
