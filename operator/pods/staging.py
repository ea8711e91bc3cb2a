"""Storage of a stage pod: which PVCs it mounts (and which writable), and the init containers that stage
its hf:// inputs (``python -m branchmerge.trainer.staging``, in the trainer image) onto a shared volume."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from urllib.parse import urlparse

from ...api.graph import input_refs
from ...api.labels import ANNOTATION_HF_SECRET
from ...api.uris import InvalidHfUri, hf_inputs, parse_hf_uri, staged_name
from ..options import OperatorOptions
from .run import Run, UnsupportedSpec

PVC_ROOT = "/mnt/pvc"
STAGING_ROOT = "/mnt/staging"

# Inputs are mounted read-only; these locations are written by the stage besides spec.output.
WRITTEN = ("checkpointing",)


def hf_secret_for(cr: dict, opts: OperatorOptions) -> str | None:
    """The Secret holding the token the staging init containers download with: the CR's annotation wins
    over the operator-wide default."""
    annotations = cr.get("metadata", {}).get("annotations") or {}
    return annotations.get(ANNOTATION_HF_SECRET) or opts.hf_token_secret


def storage_needs(run: Run) -> tuple[dict[str, bool], list[tuple[str, tuple[str, ...]]]]:
    """(claims -> mounted writable, hf:// inputs to stage: URI and allowPatterns); UnsupportedSpec for what
    pods cannot do."""
    output_uri = run.spec.get("output", {}).get("uri")
    if not output_uri:
        raise UnsupportedSpec("spec.output.uri: required (the operator has no --default-output-root)")
    claims: dict[str, bool] = {}
    out = urlparse(output_uri)
    if out.scheme == "pvc":
        claims[out.netloc] = True
    elif out.scheme != "file":
        raise UnsupportedSpec(f"spec.output.uri: {out.scheme}:// outputs are not supported on Kubernetes; "
                              "use pvc://claim/path")
    for field in WRITTEN:
        written = urlparse((run.spec.get(field) or {}).get("uri") or "")
        if written.scheme == "pvc":
            claims[written.netloc] = True
    for ref in input_refs(run.spec):
        if ref.uri is None:
            continue
        uri = urlparse(ref.uri)
        if uri.scheme == "pvc":
            claims.setdefault(uri.netloc, False)
        elif uri.scheme == "hf":
            try:
                parse_hf_uri(ref.uri)  # what the API's pattern cannot say (hf://datasets/org, a '..' in the path)
            except InvalidHfUri as err:
                raise UnsupportedSpec(f"{ref.path}.uri: {err}") from None
        elif uri.scheme == "s3":
            raise UnsupportedSpec(f"{ref.path}.uri: s3:// inputs are not staged by the operator; copy them to a "
                                  "PVC and use pvc://")
    return claims, hf_inputs(run.spec)  # one copy per URI and file selection


def staging_command(uri: str, allow_patterns: Sequence[str] = ()) -> list[str]:
    """The stage-input init container's command for one hf:// input (trainer/staging.py); a model repository
    without a subpath or patterns keeps the first form (REPO REVISION DEST), which older trainer images run."""
    hf = parse_hf_uri(uri)
    command = ["python", "-m", "branchmerge.trainer.staging", hf.repo_id, hf.revision or "",
               f"{STAGING_ROOT}/{staged_name(uri, allow_patterns)}"]
    if hf.repo_type != "model":
        command += ["--repo-type", hf.repo_type]
    if hf.subpath:
        command += ["--subpath", hf.subpath]
    for pattern in allow_patterns:
        command += ["--allow-pattern", pattern]
    return command


def _volume_name(prefix: str, text: str) -> str:
    name = f"{prefix}-{text}".lower().replace(".", "-")
    if len(name) > 63:
        name = f"{name[:54]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return name


def storage_volumes(run: Run, opts: OperatorOptions) -> tuple[list[dict], list[dict], list[tuple[str, tuple[str, ...]]]]:
    """(volumes, the stage container's mounts, hf:// inputs to stage) for the run's claims and inputs."""
    claims, staged = storage_needs(run)
    volumes: list[dict] = []
    mounts: list[dict] = []
    for claim, writable in sorted(claims.items()):
        vol = _volume_name("pvc", claim)
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable})
    if staged:
        if opts.staging_claim:
            volumes.append({"name": "staging", "persistentVolumeClaim": {"claimName": opts.staging_claim}})
        else:
            volumes.append({"name": "staging", "emptyDir": {}})
        mounts.append({"name": "staging", "mountPath": STAGING_ROOT, "readOnly": True})
    return volumes, mounts, staged


def staging_init_containers(run: Run, staged: list[tuple[str, tuple[str, ...]]], base: dict,
                            resources: dict) -> list[dict]:
    """One init container per hf:// input, each staging it once even on a staging PVC shared by pods and
    CRs (a lock; atomic publish). ``base``: image and security context; ``resources``: the init amounts."""
    token_env = []
    if run.hf_secret:
        name, _, key = run.hf_secret.partition("/")
        token_env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": key or "token"}}}]
    return [{
        **base,
        "name": f"stage-input-{i}",
        "command": staging_command(uri, patterns),
        # the command writes one line of why it failed there (the log tail if it could not)
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": token_env + [{"name": "HOME", "value": "/tmp"},
                            {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
                            {"name": "BRANCHMERGE_TERMINATION_LOG", "value": "/dev/termination-log"}],
        "volumeMounts": [{"name": "staging", "mountPath": STAGING_ROOT}, {"name": "tmp", "mountPath": "/tmp"}],
        **({"resources": resources} if resources else {}),
    } for i, (uri, patterns) in enumerate(staged)]
