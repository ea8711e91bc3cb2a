"""Operator-wide settings that shape the children (command-line flags of ``branchmerge operator``)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorOptions:
    image: str = "ghcr.io/branchmerge/trainer:0.1.0"
    """Trainer image for pods whose spec has no resources.image."""
    image_pull_policy: str = "IfNotPresent"
    default_output_root: str | None = None
    """pvc://claim/prefix: outputs of CRs without spec.output.uri go to <root>/<namespace>/<kind>/<name>."""
    hf_token_secret: str | None = None
    """Secret ``name`` or ``name/key`` (key defaults to ``token``) with the Hugging Face token for hf://
    staging; a CR can name another with the annotation branchmerge.dev/hf-token-secret."""
    staging_claim: str | None = None
    """PVC to stage hf:// inputs into (a cache shared by runs); default: an emptyDir per pod."""
    progress_url: str | None = None
    """The operator's progress endpoint as pods reach it (http://<service>.<namespace>.svc:<port>/progress);
    when set, pods report live progress there with a projected token of the audience branchmerge.dev/progress
    (operator/progress_api.py). Pods never get an API token: only the operator writes CR status."""
    progress_interval_seconds: float = 10.0
    default_cpu_request: str | None = "500m"
    """CPU request of stage containers whose spec has no resources.cpu (a request, no limit: the pod is
    Burstable instead of BestEffort, the first evicted under node pressure). None: no default."""
    default_memory_request: str | None = "2Gi"
    """Memory request of stage containers whose spec has no resources.memory, to which the /dev/shm size is
    added (its pages are charged to the pod's memory). None: no default."""
    pending_deadline_seconds: float = 900.0
    """An attempt whose pods have not started after this long while a problem keeps them from it (quota,
    unschedulable, image pull, a missing Secret...: operator/pending.py) fails with that reason. 0: never."""
    pending_recheck_seconds: float = 10.0
    """How often a CR whose pods are held up looks at them again (the operator does not watch pods)."""
    run_as_user: int = 1000
    max_backoff_seconds: float = 3600.0
