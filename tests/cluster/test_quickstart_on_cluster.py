"""The quickstart pipeline through the real operator on the stand-in cluster, against `branchmerge run`.

The reduced quickstart's manifests are applied as CRs to the API-server stand-in (CRD defaulting,
pruning, schema + CEL validation), reconciled by `branchmerge operator` running in the operator image's
environment, and every stage runs as a pod: the Job controller creates it, the node runs its real
command (`branchmerge stage ...`) in the trainer-cpu image's environment, with the ConfigMap, the PVC
and /tmp mounted at the paths the operator chose, as uid 1000. Every CR must succeed, and every model,
dataset and generation record it publishes must have the same sha256 as the same stage's output in the
`branchmerge run` of those manifests (the reduced_quickstart fixture); eval scores must be equal.
The stages' own run records (branchmerge_*.json, teachergen.json, results.*) name their input URIs and
times, so they are compared by their scores, not by bytes.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from branchmerge.api.outputs import combined_digest, read_manifest
from testcluster.cluster import TRAINER_CPU_IMAGE, Cluster

from .helpers import NEEDS_IMAGES, diagnose, on_claim, phases

pytestmark = NEEDS_IMAGES

NS = "qs"
CLAIM = "qs"
def _scores(folder) -> dict:
    results = json.loads((folder / "results.json").read_text())
    return {name: (b["pass1"], b["n"]) for name, b in results["benchmarks"].items()}


def _check_lineage(tree: dict, statuses: dict) -> None:
    """Every output node is a CR of the pipeline with the digest in its status; every leaf is a raw input."""
    nodes, stack = [], [tree]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.get("inputs", []))
    outputs = [n for n in nodes if "kind" in n]
    assert {f"{n['kind']}/{n['name']}" for n in outputs} >= {"Merge/qs-merged", "Merge/qs-math-science",
                                                             "BranchSFT/qs-code", "TeacherGen/qs-traces-math",
                                                             "BranchSFT/qs-teacher"}
    for n in outputs:
        assert n["digest"] == statuses[f"{n['kind']}/{n['name']}"]["output"]["digest"], n
    leaves = {n["uri"] for n in nodes if "kind" not in n}
    assert leaves and all(u.startswith(f"pvc://{CLAIM}/inputs/") for u in leaves), leaves


# The session's reduced quickstart (setup, ~3 min) plus 25 CRs through the operator, every SFT pod building
# DeepSpeed's CPU op in its own /tmp as a real pod does: over the suite's 900 s on a loaded machine.
@pytest.mark.timeout(2400)
def test_quickstart_through_the_operator_matches_branchmerge_run(reduced_quickstart, output_content, tmp_path):
    root, proc = reduced_quickstart
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    local = [d for f in sorted((root / "manifests").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    docs = on_claim(local, root, CLAIM)

    started = time.time()
    with Cluster(tmp_path / "cluster") as cluster:
        cluster.namespace(NS)
        claim = cluster.pvc(NS, CLAIM)
        shutil.copytree(root / "inputs", claim / "inputs")
        cluster.operator(NS, "--image", TRAINER_CPU_IMAGE, "--default-output-root", f"pvc://{CLAIM}/outputs")
        for doc in docs:
            cluster.api.create(doc, NS)
        # Done when all succeeded; a Failed CR ends the wait at once (its downstreams would wait for it,
        # Waiting/UpstreamFailed, until a user fixes it).
        try:
            final = cluster.wait(lambda: (lambda p: p if all(v == "Succeeded" for v in p.values()) or
                                          "Failed" in p.values() else None)(phases(cluster, NS, docs)),
                                 1500, "every CR to succeed", 2.0)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{diagnose(cluster, NS, docs)}") from None
        failed = {k: v for k, v in final.items() if v != "Succeeded"}
        assert not failed, f"{failed}\n{diagnose(cluster, NS, docs)}"
        wall = time.time() - started
        statuses = {f"{d['kind']}/{d['metadata']['name']}":
                    cluster.api.get(d["kind"], NS, d["metadata"]["name"])["status"] for d in docs}
        pods = cluster.api.list("Pod", NS)
        children = sum(1 for kind in ("Merge", "Eval") for cr in cluster.api.list(kind, NS)
                       if any(o.get("kind") == "MergeSearch" for o in cr["metadata"].get("ownerReferences", [])))
        assert children == 4 + 2, children  # the reduced search: 2 trials, each a chain of 2 Merges and an Eval
        # lineage from the CRs alone: from: refs lead to the upstream CRs, whose status has the output's digest
        lineage = subprocess.run([sys.executable, "-m", "branchmerge.cli", "lineage", "--kubernetes", "-n", NS,
                                  "--kubeconfig", str(cluster.kubeconfig), "Merge/qs-merged", "-o", "json"],
                                 capture_output=True, text=True, timeout=120)
        assert lineage.returncode == 0, lineage.stderr
        tree = json.loads(lineage.stdout)

    compared = 0
    for key, status in statuses.items():
        kind, name = key.split("/")
        out_uri = status["output"]["uri"]
        if kind == "MergeSearch":  # its output is its winning trial's Merge, a child named by its spec's hash
            winner = status["output"]["uri"].rsplit("/", 1)[-1]
            assert out_uri == f"pvc://{CLAIM}/outputs/{NS}/merge/{winner}", out_uri
            published = claim / "outputs" / NS / "merge" / winner
            local_search = json.loads((root / "status" / "mergesearch" / f"{name}.json").read_text())["status"]
            assert local_search["output"]["uri"].endswith(f"/merge/{winner}"), "the same winner as branchmerge run's"
            ref_folder = root / "outputs" / "merge" / winner
        else:
            assert out_uri == f"pvc://{CLAIM}/outputs/{NS}/{kind.lower()}/{name}"
            published = claim / "outputs" / NS / kind.lower() / name
            ref_folder = root / "outputs" / kind.lower() / name
        files = read_manifest(published)
        assert files is not None, f"{key}: nothing published at {published}"
        assert output_content(published) == output_content(ref_folder), f"{key}: outputs differ from branchmerge run's"
        compared += len(output_content(published))
        if kind == "Eval":
            assert _scores(published) == _scores(ref_folder), key
        assert status["output"]["digest"] == combined_digest(files), f"{key}: status does not match what is published"
    _check_lineage(tree, statuses)
    # The Eval pods added their scores to the cards of the models they scored (the models' claim is theirs too)
    card = (claim / "outputs" / NS / "merge" / "qs-merged" / "README.md").read_text()
    assert "| qs-eval-merged | math |" in card and "model-index:" in card
    # Each stage ran once, as a pod of the trainer-cpu image, non-root, and every pod succeeded: the pipeline's
    # own CRs and the search's children (owned Merge and Eval CRs); a MergeSearch runs no pod itself.
    assert len(pods) == len(docs) - 1 + children and all(p["status"]["phase"] == "Succeeded" for p in pods)
    assert {p["spec"]["containers"][0]["image"] for p in pods} == {TRAINER_CPU_IMAGE}
    print(f"\n{len(docs)} CRs succeeded through the operator in {wall:.0f} s; {compared} published files "
          f"identical to branchmerge run's")
