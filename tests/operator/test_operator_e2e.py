"""Opt-in end-to-end run on a real cluster (skipped unless KUBECONFIG is set).

Applies crds/ and a one-Merge example into $BRANCHMERGE_E2E_NAMESPACE (default branchmerge-e2e, created if
missing), runs `branchmerge operator` for that namespace (unless BRANCHMERGE_E2E_OPERATOR=external: an
installed operator serves it), and waits for the CR to get its Job and a phase. With
BRANCHMERGE_E2E_SUCCEED=1 (the trainer image can pull and the claim exists) it waits for Succeeded.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not os.environ.get("KUBECONFIG"),
                                                  reason="needs a real cluster (set KUBECONFIG)")]

REPO = Path(__file__).resolve().parents[2]
NS = os.environ.get("BRANCHMERGE_E2E_NAMESPACE", "branchmerge-e2e")


def _apply_crds(ext) -> None:
    from kubernetes.client.rest import ApiException

    for path in sorted((REPO / "crds").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        try:
            ext.create_custom_resource_definition(body)
        except ApiException as err:
            if err.status != 409:
                raise


def test_example_reaches_a_phase_on_a_real_cluster():
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    config.load_kube_config(config_file=os.environ["KUBECONFIG"])
    _apply_crds(client.ApiextensionsV1Api())
    core, custom, batch = client.CoreV1Api(), client.CustomObjectsApi(), client.BatchV1Api()
    try:
        core.create_namespace({"metadata": {"name": NS}})
    except ApiException as err:
        if err.status != 409:
            raise
    name = f"e2e-merge-{int(time.time())}"
    cr = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge", "metadata": {"name": name},
          "spec": {"method": "linear", "models": [{"uri": "pvc://models/a"}, {"uri": "pvc://models/b"}],
                   "output": {"uri": f"pvc://models/{name}"}, "resources": {"cpu": "1", "memory": "2Gi"}}}
    time.sleep(2)  # CRDs become established
    custom.create_namespaced_custom_object("branchmerge.dev", "v1alpha1", NS, "merges", cr)
    operator = None
    if os.environ.get("BRANCHMERGE_E2E_OPERATOR") != "external":
        operator = subprocess.Popen([sys.executable, "-m", "branchmerge.cli", "operator", "-n", NS,
                                     "--kubeconfig", os.environ["KUBECONFIG"], "--metrics-port", "0",
                                     "--liveness", ""])
    try:
        want = {"Succeeded"} if os.environ.get("BRANCHMERGE_E2E_SUCCEED") == "1" else \
            {"Running", "Pending", "Suspended", "Succeeded", "Failed"}
        deadline = time.time() + float(os.environ.get("BRANCHMERGE_E2E_TIMEOUT", "600"))
        phase = None
        while time.time() < deadline:
            obj = custom.get_namespaced_custom_object("branchmerge.dev", "v1alpha1", NS, "merges", name)
            phase = (obj.get("status") or {}).get("phase")
            if phase in want:
                break
            time.sleep(2)
        assert phase in want, f"{name} ended in phase {phase}"
        jobs = batch.list_namespaced_job(NS, label_selector=f"branchmerge.dev/name={name}").items
        assert jobs and jobs[0].metadata.owner_references[0].name == name
        pod_spec = jobs[0].spec.template.spec
        assert pod_spec.security_context.run_as_non_root is True
    finally:
        custom.delete_namespaced_custom_object("branchmerge.dev", "v1alpha1", NS, "merges", name)
        if operator is not None:
            operator.send_signal(2)
            operator.wait(30)
