"""Resolve a CR into the manifest a stage runs: every ``from:`` replaced by its upstream's output URI,
and an output URI assigned when the spec leaves it out. Pure: both control planes call it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..api.graph import Reference, references
from ..api.resources import CustomResource


@dataclass(frozen=True)
class Unresolved:
    """Why a CR cannot be resolved yet: an upstream is missing, not finished, or failed."""

    reason: str  # UpstreamNotFound | UpstreamNotReady | UpstreamFailed
    ref: Reference
    message: str


def _set_path(doc: dict, path: str, value) -> None:
    """Replace the object holding ``from`` at ``path`` (spec.models[1].from) by ``{uri: value}`` + its siblings."""
    parts: list = []
    for token in path.replace("[", ".[").split("."):
        if token.startswith("["):
            parts.append(int(token[1:-1]))
        elif token:
            parts.append(token)
    holder = doc
    for part in parts[:-2]:
        holder = holder[part]
    ref_obj = holder[parts[-2]]
    ref_obj.pop("from", None)
    ref_obj["uri"] = value


def resolve(resource: CustomResource, outputs: dict[str, str], default_output: str | None = None,
            refs: list[Reference] | None = None) -> dict:
    """The manifest as the user wrote it (defaults left implicit, so a stage can tell what was asked for)
    with refs replaced. ``outputs`` maps Kind/name to output URI of succeeded upstreams; KeyError-free:
    call ``blockers`` first."""
    doc = resource.model_dump(by_alias=True, exclude_none=True, exclude_unset=True, mode="json")
    doc.update(apiVersion=resource.api_version, kind=resource.kind)  # type: ignore[attr-defined]
    doc.pop("status", None)
    for ref in refs if refs is not None else references(resource):  # refs: precomputed references()
        _set_path(doc, ref.path, outputs[ref.key])
    if not doc["spec"].get("output", {}).get("uri") and default_output:
        doc["spec"].setdefault("output", {})["uri"] = default_output
    return doc


def blockers(resource: CustomResource, phases: dict[str, str | None],
             refs: list[Reference] | None = None) -> list[Unresolved]:
    """What keeps ``resource`` from starting. ``phases`` maps Kind/name to phase (None: exists, no status);
    ``refs``: precomputed ``references(resource)``."""
    out = []
    for ref in refs if refs is not None else references(resource):
        if ref.key not in phases:
            out.append(Unresolved("UpstreamNotFound", ref, f"{ref.key} (at {ref.path}) does not exist"))
        elif phases[ref.key] == "Failed":
            out.append(Unresolved("UpstreamFailed", ref, f"{ref.key} (at {ref.path}) failed"))
        elif phases[ref.key] != "Succeeded":
            out.append(Unresolved("UpstreamNotReady", ref,
                                  f"waiting for {ref.key} (at {ref.path}), now {phases[ref.key] or 'Pending'}"))
    order = {"UpstreamFailed": 0, "UpstreamNotFound": 1, "UpstreamNotReady": 2}
    return sorted(out, key=lambda u: order[u.reason])


def spec_hash(resolved: dict) -> str:
    """Identity of a resolved run: same spec and same input URIs give the same hash (caching, Job names)."""
    canonical = json.dumps({"kind": resolved["kind"], "spec": resolved["spec"]}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]

