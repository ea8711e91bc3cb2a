"""How a kind's stage process is started, derived once from its spec for both control planes.

The Kubernetes builders (operator/pods/) turn a profile into pods, and the local runner
(operator/local/launch.py) into subprocesses; neither looks at ``resources.nodes``, ``gpusPerNode`` or the
spec's secret references on its own, so the two planes cannot drift apart on how a stage is laid out.

Three ways to start a stage:

- ``process``: one process (Merge; everything that asks for one node and at most one rank per node).
- ``torchrun``: BranchSFT over ``nodes`` x ``gpusPerNode`` ranks (one per CPU core-group when no GPU);
  the ranks rendezvous, so they start together.
- ``workers``: TeacherGen and Eval over ``nodes`` data-parallel workers, one process each, with RANK and
  WORLD_SIZE saying which shard is theirs; they share files, not a rendezvous.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..api.common import API_KEY_ENV
from ..api.resources import KIND_INFO

Launcher = Literal["process", "torchrun", "workers"]

# Kinds whose work is split across several processes, and how: SFT ranks train one model together,
# generation and evaluation workers each take a shard of the prompts.
SPLITS: dict[str, Launcher] = {"BranchSFT": "torchrun", "TeacherGen": "workers", "Eval": "workers"}

# Where a spec names the Secret holding an OpenAI-compatible endpoint's key (its variable: api.common.API_KEY_ENV).
ENGINE_PATHS = (("teacher", "engine"), ("engine",))


@dataclass(frozen=True)
class StageVar:
    """One variable of the stage's environment from its spec: a literal ``value``, or a ``secret``
    (Secret name, key) that never appears as a literal. A Secret key on the cluster; locally the runner's
    own variable of the same name, since there is no Secret store."""

    name: str
    value: str | None = None
    secret: tuple[str, str] | None = None


@dataclass(frozen=True)
class LaunchProfile:
    kind: str
    stage: str  # `branchmerge stage <stage>`
    launcher: Launcher
    nodes: int  # pods on the cluster
    procs_per_node: int  # processes per pod: the torchrun ranks of one node, else 1
    env: tuple[StageVar, ...]  # in the order they are set: a later one wins

    @property
    def ranks(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def torchrun(self) -> bool:
        return self.launcher == "torchrun"

    @property
    def rendezvous(self) -> bool:
        """The pods must all be up before the stage starts (torchrun's rendezvous on pod 0)."""
        return self.torchrun and self.nodes > 1

    def stage_args(self, spec_file: str, result_file: str) -> list[str]:
        """The arguments after the ``branchmerge`` entry point, the same on both planes."""
        return ["stage", self.stage, "--spec", str(spec_file), "--result", str(result_file)]


def _stage_vars(spec: dict) -> list[StageVar]:
    found = []
    for path in ENGINE_PATHS:
        node = spec
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        ref = (node.get("endpoint") or {}).get("apiKeySecretRef") if isinstance(node, dict) else None
        if ref:
            found.append(StageVar(API_KEY_ENV, secret=(ref["name"], ref["key"])))
    for item in (spec.get("resources") or {}).get("env") or []:
        if "valueFrom" in item:  # secrets only by reference
            ref = item["valueFrom"]["secretKeyRef"]
            found.append(StageVar(item["name"], secret=(ref["name"], ref["key"])))
        else:
            found.append(StageVar(item["name"], value=item.get("value", "")))
    return found


def launch_profile(kind: str, spec: dict) -> LaunchProfile:
    """The profile of a stage kind from its spec as written in a manifest (camelCase keys)."""
    info = KIND_INFO.get(kind)
    if info is None or info.stage is None:
        raise ValueError(f"{kind} has no stage of its own to launch")
    resources = spec.get("resources") or {}
    nodes = int(resources.get("nodes", 1))
    gpus = int(resources.get("gpusPerNode", 0))
    split = SPLITS.get(kind)
    launcher: Launcher = "process"
    procs = 1
    if split == "torchrun" and nodes * max(gpus, 1) > 1:
        launcher, procs = "torchrun", max(gpus, 1)
    elif split == "workers" and nodes > 1:
        launcher = "workers"
    elif split is None:
        nodes = 1  # a kind that does not split runs once, whatever resources.nodes says
    return LaunchProfile(kind=kind, stage=info.stage, launcher=launcher, nodes=nodes, procs_per_node=procs,
                         env=tuple(_stage_vars(spec)))
