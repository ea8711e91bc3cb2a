"""The operator's view of the cluster, fed by kopf's watch events: the four kinds and the Jobs the
operator owns. Reconciles read only from here (plus a few on-demand GETs), which keeps them cheap."""
from __future__ import annotations

from .naming import owner_key_of

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


def upstream_keys(spec) -> set[tuple[str, str]]:
    """(kind, name) of every ``from:`` in a raw spec (no parsing: this runs on every watch event)."""
    found: set[tuple[str, str]] = set()
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("from")
            if isinstance(ref, dict) and "kind" in ref and "name" in ref:
                found.add((ref["kind"], ref["name"]))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


class Store:
    """Objects are stored as received (fresh JSON per watch event or API answer) and never mutated."""

    def __init__(self) -> None:
        self.crs: dict[Key, dict] = {}
        self.refs: dict[Key, set[tuple[str, str]]] = {}  # CR -> (kind, name) of its upstreams
        self.jobs: dict[Key, dict[str, dict]] = {}  # owner key -> job name -> job
        self.configmaps: dict[tuple[str, str], dict] = {}  # (namespace, name) -> run ConfigMap (cache)

    # ---- CRs ----
    def put_cr(self, body: dict) -> tuple[bool, bool]:
        """Store a CR: (a version not seen before?, is it new or did its phase change -- downstreams care)."""
        meta = body["metadata"]
        key = (meta.get("namespace", ""), body["kind"], meta["name"])
        old = self.crs.get(key)
        if not _newer(body, old):
            return False, False
        self.crs[key] = body
        self.refs[key] = upstream_keys(body.get("spec"))
        return True, old is None or (old.get("status") or {}).get("phase") != (body.get("status") or {}).get("phase")

    def drop_cr(self, namespace: str, kind: str, name: str) -> None:
        self.crs.pop((namespace, kind, name), None)
        self.refs.pop((namespace, kind, name), None)
        for (ns, cm_name) in [k for k in self.configmaps if k[0] == namespace and
                              self.configmaps[k].get("metadata", {}).get("labels", {}).get(
                                  "branchmerge.dev/name") == name]:
            self.configmaps.pop((ns, cm_name), None)

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
        """Store a Job the operator owns; its owner's key if this is a version not seen before."""
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
        self.jobs.get(key, {}).pop(job["metadata"]["name"], None)
        return key

    def jobs_of(self, key: Key) -> list[dict]:
        return list(self.jobs.get(key, {}).values())
