"""Names and owner labels of the children the operator creates (deterministic: restart-safe, create-if-absent);
the label keys themselves are api/labels.py."""
from __future__ import annotations

import hashlib
import re

from ..api.labels import LABEL_KIND, LABEL_NAME, MANAGED_BY, MANAGED_BY_VALUE

# Indexed Job pods get the hostname "<job>-<index>" (a DNS label, <= 63 chars): keep room for the index.
MAX_CHILD_NAME = 52


def _dns_label(text: str) -> str:
    text = re.sub(r"[^a-z0-9-]", "-", text.lower())
    return text.strip("-") or "x"


def child_name(cr_name: str, run_hash: str, attempt: int | None = None, limit: int = MAX_CHILD_NAME) -> str:
    """``<cr>-<hash8>[-<attempt>]``: a DNS-1035 label (Services need one) of at most ``limit`` characters.

    Too-long CR names are cut and get a short digest of the full name so distinct CRs never collide.
    """
    suffix = f"-{run_hash[:8]}" + (f"-{attempt}" if attempt is not None else "")
    base = _dns_label(cr_name)
    if not base[0].isalpha():  # DNS-1035: Services must start with a letter
        base = "bm-" + base
    if len(base) + len(suffix) <= limit:
        return base + suffix
    digest = hashlib.sha256(cr_name.encode()).hexdigest()[:6]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-')}-{digest}{suffix}"


def owner_labels(kind: str, name: str) -> dict[str, str]:
    return {MANAGED_BY: MANAGED_BY_VALUE, LABEL_KIND: kind, LABEL_NAME: name}


def owner_key_of(child: dict) -> str | None:
    """``Kind/name`` of the CR a child belongs to, from its labels (None: not ours)."""
    labels = child.get("metadata", {}).get("labels") or {}
    if labels.get(MANAGED_BY) != MANAGED_BY_VALUE or LABEL_KIND not in labels:
        return None
    return f"{labels[LABEL_KIND]}/{labels.get(LABEL_NAME, '')}"


def owner_uid_of(child: dict) -> str | None:
    """The uid of the object that controls ``child`` (its controller ownerReference), if any."""
    for ref in child.get("metadata", {}).get("ownerReferences") or ():
        if ref.get("controller"):
            return ref.get("uid")
    return None


def owned_by(child: dict, uid: str | None) -> bool:
    """Does ``child`` belong to the CR with this uid? Children are found by name and labels, which a CR
    deleted and re-created under the same name shares with its predecessor until the garbage collector
    has removed the old children: only the ownerReference tells them apart. (A child without a
    controller reference, or a CR whose uid is unknown, cannot be told apart: it counts as owned.)"""
    owner = owner_uid_of(child)
    return not uid or owner is None or owner == uid
