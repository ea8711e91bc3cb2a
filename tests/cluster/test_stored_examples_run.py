"""Anything the CRD accepts must run: every example, in the form the API server stores it, gets past
the stage's own spec checks.

Each CR of examples/ is created on the API-server stand-in, which prunes it, fills in the CRD's
defaults and validates it (schema + CEL), then read back as the operator sees it, resolved by the
operator's own resolve() (from: references pointing at made-up upstream outputs), and run by the real
stage entry point. The inputs do not exist here, so every stage must stop at its first input with exit 2
naming that input, never at its spec: before the fix of the CRD defaults, every Merge stopped at
`spec.parameters.rescale: unknown parameter for arcee_fusion` (or normalize, lambda, weight).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from branchmerge.api.graph import references
from branchmerge.api.validation import parse_resource
from branchmerge.operator.resolve import resolve
from branchmerge.trainer.stage import STAGES, run_stage
from testcluster.apiserver import ApiServer
from branchmerge.operator.emulator import Api

REPO = Path(__file__).resolve().parents[2]
STAGE_OF = {kind: stage for stage, kind in STAGES.items()}
EXAMPLES = [(f.relative_to(REPO / "examples").as_posix(), i, d)
            for f in sorted((REPO / "examples").glob("*/*.yaml"))
            for i, d in enumerate(yaml.safe_load_all(f.read_text())) if d and d["kind"] != "MergeSearch"]  # stages only:
# a MergeSearch runs none itself (its Merge and Eval children do)


@pytest.fixture(scope="module")
def server():
    with ApiServer(REPO / "crds") as srv:
        api = Api(srv.url)
        api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ex"}})
        yield api


@pytest.mark.parametrize("where,index,doc", EXAMPLES, ids=[f"{w}#{i}" for w, i, _ in EXAMPLES])
def test_the_stored_form_of_every_example_reaches_its_inputs(server, where, index, doc, tmp_path, monkeypatch):
    monkeypatch.setenv("BRANCHMERGE_PVC_ROOT", str(tmp_path / "pvc"))
    monkeypatch.setenv("BRANCHMERGE_STAGING_ROOT", str(tmp_path / "staging"))
    monkeypatch.delenv("BRANCHMERGE_TERMINATION_LOG", raising=False)
    name = doc["metadata"]["name"]
    server.create(doc, "ex")
    stored = server.get(doc["kind"], "ex", name)
    server.delete(doc["kind"], "ex", name)
    assert stored["spec"] != doc["spec"] or doc["kind"] in ("TeacherGen",), \
        "the server stored the manifest as written: it should have filled in CRD defaults"
    resource = parse_resource(stored)
    outputs = {ref.key: f"pvc://upstream/{ref.key.lower()}" for ref in references(resource)}
    resolved = resolve(resource, outputs, f"pvc://out/ex/{doc['kind'].lower()}/{name}")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps(resolved))
    code = run_stage(STAGE_OF[doc["kind"]], spec_file, tmp_path / "result.json")
    result = json.loads((tmp_path / "result.json").read_text())
    missing_input = ("does not exist", "must be staged by the control plane")  # a pvc:// path / an hf:// repo
    assert code == 2 and any(text in result["error"] for text in missing_input), \
        f"{where}#{index} ({doc['kind']}/{name}) stopped at its spec, not its inputs: {result.get('error')}"
