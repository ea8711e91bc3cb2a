"""One run of a CR, the input of every pod builder: its identity, the resolved manifest, its launch profile."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from ...api.common import API_VERSION
from ...api.labels import LABEL_ATTEMPT, LABEL_RUN
from ..launch_profile import LaunchProfile, launch_profile
from ..naming import child_name, owner_labels


class UnsupportedSpec(ValueError):
    """The spec cannot run on Kubernetes as written (permanent: InvalidSpec)."""


@dataclass(frozen=True)
class Run:
    """One run of a CR: its identity, the resolved manifest and the operator settings."""

    kind: str
    name: str
    namespace: str
    uid: str
    run_hash: str
    resolved: dict
    labels: dict = field(default_factory=dict)
    hf_secret: str | None = None  # "name" or "name/key"

    @property
    def spec(self) -> dict:
        return self.resolved["spec"]

    @property
    def resources(self) -> dict:
        return self.spec.get("resources", {})

    @property
    def run_policy(self) -> dict:
        return self.spec.get("runPolicy", {})

    @cached_property
    def profile(self) -> LaunchProfile:
        return launch_profile(self.kind, self.spec)

    @property
    def pods(self) -> int:
        """Pods per attempt: one per node of a multi-node or data-parallel launch."""
        return self.profile.nodes

    @property
    def configmap_name(self) -> str:
        return child_name(self.name, self.run_hash)

    def job_name(self, attempt: int) -> str:
        return child_name(self.name, self.run_hash, attempt)

    def owner_reference(self) -> dict:
        return {"apiVersion": API_VERSION, "kind": self.kind, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}

    def child_labels(self, attempt: int | None = None) -> dict[str, str]:
        labels = {k: v for k, v in self.labels.items() if not k.startswith("kueue.x-k8s.io/")}
        labels.update(owner_labels(self.kind, self.name))
        labels[LABEL_RUN] = self.run_hash
        if attempt is not None:
            labels[LABEL_ATTEMPT] = str(attempt)
        return labels
