"""BranchSFT checkpoints on their own volume (spec.checkpointing.uri): mounted writable, inputs stay read-only."""
from __future__ import annotations

import pytest

from branchmerge.api.validation import InvalidManifest, parse_resource
from branchmerge.operator.pods.job import build_job
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import target

from .kube_objects import SFT_SPEC, cr

OPTS = OperatorOptions()


def _claims(pod: dict) -> dict[str, bool]:
    """claim -> mounted read-only, from the main container's mounts."""
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
               if "persistentVolumeClaim" in v}
    return {volumes[m["name"]]: m["readOnly"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in volumes}


def test_checkpoint_volume_is_mounted_writable_and_inputs_read_only():
    spec = {**SFT_SPEC, "checkpointing": {"everySteps": 200, "keep": 1, "uri": "pvc://scratch/tinyr1/math"}}
    run = target(cr("BranchSFT", "math", spec), {}, OPTS)
    pod = build_job(run, 1, OPTS)["spec"]["template"]["spec"]
    assert _claims(pod) == {"data": True, "models": False, "scratch": False}
    without = build_job(target(cr("BranchSFT", "math", SFT_SPEC), {}, OPTS), 1, OPTS)["spec"]["template"]["spec"]
    assert "scratch" not in _claims(without)


@pytest.mark.parametrize("uri", ["hf://org/ckpt", "s3://bucket/ckpt"])
def test_checkpoints_need_a_writable_location(uri):
    doc = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "BranchSFT", "metadata": {"name": "math"},
           "spec": {**SFT_SPEC, "checkpointing": {"uri": uri}}}
    with pytest.raises(InvalidManifest) as err:
        parse_resource(doc)
    assert "spec.checkpointing.uri" in str(err.value) and "writable location" in str(err.value)
