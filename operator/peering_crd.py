"""The kopf peering CRDs (kopf.dev/v1 ClusterKopfPeering and KopfPeering), written to crds/ with ours.

kopf's peering is how several operator replicas agree that only one acts: each replica writes a
heartbeat into a peering object; the one with the highest priority works, the others stand by
(``branchmerge operator --peering NAME``; cluster-wide mode uses a ClusterKopfPeering, namespaced mode a
KopfPeering in every served namespace). The status is free-form: kopf owns it.
"""
from __future__ import annotations

import yaml


def _crd(kind: str, plural: str, scope: str) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev", "labels": {"app.kubernetes.io/part-of": "branchmerge"}},
        "spec": {
            "scope": scope,
            "group": "kopf.dev",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }},
            }],
        },
    }


PEERING_CRDS = {
    "kopf.dev_clusterkopfpeerings.yaml": _crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
    "kopf.dev_kopfpeerings.yaml": _crd("KopfPeering", "kopfpeerings", "Namespaced"),
}


def render_peering(filename: str) -> str:
    return "# kopf's peering CRD (leader election of branchmerge operator replicas); do not edit.\n" + \
        yaml.safe_dump(PEERING_CRDS[filename], sort_keys=False, width=120)
