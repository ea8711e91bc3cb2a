"""What the cluster end-to-end tests share: quickstart manifests moved onto a PVC, CR phases, and a
readable account of what went wrong (operator log, pod states and logs) when a CR does not succeed."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from testcluster import images
from testcluster.cluster import Cluster

# Every end-to-end test on the stand-in runs the operator and stage pods in their images' environments.
NEEDS_IMAGES = [pytest.mark.slow,
                pytest.mark.skipif(not all((images.venv_dir(n) / "bin" / "python").exists()
                                           for n in ("operator", "trainer-cpu")),
                                   reason="image environments not built (scripts/install.sh builds them)")]
PLURALS = {"TeacherGen": "teachergens", "BranchSFT": "branchsfts", "Merge": "merges", "Eval": "evals"}


def on_claim(docs: list[dict], local_root: Path, claim: str, cpu: str | None = "1") -> list[dict]:
    """The same manifests for a cluster: ``file://<local_root>/...`` becomes ``pvc://<claim>/...`` (the test
    copies the folder onto the claim), and each pod asks for ``cpu`` (its thread budget: the operator sets
    OMP_NUM_THREADS from it, as the local runner gives each of its 2 parallel stages 1 thread)."""
    prefix = Path(local_root).resolve().as_uri().rstrip("/") + "/"

    def move(node):
        if isinstance(node, dict):
            return {k: (f"pvc://{claim}/" + v[len(prefix):] if k == "uri" and isinstance(v, str) and
                        v.startswith(prefix) else move(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [move(v) for v in node]
        return node

    out = []
    for doc in docs:
        doc = move(copy.deepcopy(doc))
        if cpu:
            doc["spec"].setdefault("resources", {})["cpu"] = cpu
        out.append(doc)
    return out


def phase(cluster: Cluster, namespace: str, kind: str, name: str) -> str | None:
    obj = cluster.api.get(kind, namespace, name) or {}
    return (obj.get("status") or {}).get("phase")


def phases(cluster: Cluster, namespace: str, docs: list[dict]) -> dict[str, str | None]:
    return {f"{d['kind']}/{d['metadata']['name']}": phase(cluster, namespace, d["kind"], d["metadata"]["name"])
            for d in docs}


def diagnose(cluster: Cluster, namespace: str, docs: list[dict]) -> str:
    """CR conditions, the pods' states and log tails, and the operator's log: what a user would read."""
    lines = []
    for d in docs:
        obj = cluster.api.get(d["kind"], namespace, d["metadata"]["name"]) or {}
        status = obj.get("status") or {}
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        lines.append(f"{d['kind']}/{d['metadata']['name']}: {status.get('phase')} {ready.get('reason')} "
                     f"{ready.get('message', '')[:300]}")
    for pod in cluster.api.list("Pod", namespace):
        name = pod["metadata"]["name"]
        st = pod.get("status") or {}
        states = [json.dumps(c.get("state"))[:400] for c in st.get("initContainerStatuses", []) +
                  st.get("containerStatuses", [])]
        lines.append(f"pod {name}: {st.get('phase')} {st.get('reason', '')} {' | '.join(states)}")
        if st.get("phase") == "Failed":
            for container in (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]:
                try:
                    text = cluster.node.logs(namespace, name, container["name"])
                except Exception as err:  # noqa: BLE001 -- diagnostics only
                    text = f"(no log: {err})"
                lines.append(f"--- log {name}/{container['name']}:\n{text[-3000:]}")
    for op in cluster.operators:
        lines.append(f"--- operator log (started {op.starts}x):\n{op.tail(3000)}")
    return "\n".join(lines)
