"""ObjectMeta validation every kind gets (k8s.io/apimachinery/pkg/api/validation): names, generateName,
labels, annotations, finalizers, ownerReferences, and the update rules (immutable name/namespace/uid,
no new finalizers while deleting, deletionTimestamp only set by a delete).

Not emulated: managedFields validation, the annotation-specific rules of a few kinds (e.g. the
last-applied-configuration size), finalizer-name warnings.
"""
from __future__ import annotations

import json
import random
import re

from .schema import FieldError
from .selectors import key_error, value_error

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# k8s.io/apiserver/pkg/storage/names: 5 random characters from an alphabet without vowels and confusables.
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
MAX_GENERATED_BASE = 63 - 5

SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                 "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                 "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
LABEL_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
             "and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation "
             "is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
DNS1035_MSG = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
               "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
               "regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")


def subdomain_errors(name: str) -> list[str]:
    out = []
    if len(name) > 253:
        out.append("must be no more than 253 characters")
    if not DNS1123_SUBDOMAIN.match(name):
        out.append(SUBDOMAIN_MSG)
    return out


def label_name_errors(name: str) -> list[str]:
    out = []
    if len(name) > 63:
        out.append("must be no more than 63 characters")
    if not DNS1123_LABEL.match(name):
        out.append(LABEL_MSG)
    return out


def dns1035_errors(name: str) -> list[str]:
    out = []
    if len(name) > 63:
        out.append("must be no more than 63 characters")
    if not DNS1035_LABEL.match(name):
        out.append(DNS1035_MSG)
    return out


def generate_name(base: str, rng: random.Random) -> str:
    return base[:MAX_GENERATED_BASE] + "".join(rng.choice(NAME_ALPHABET) for _ in range(5))


def _q(value) -> str:
    return json.dumps(value)


def validate_labels(labels, path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    if labels is None:
        return errs
    if not isinstance(labels, dict):
        return [FieldError(path, "FieldValueTypeInvalid", "Invalid value: must be a map of strings")]
    for key, value in labels.items():
        problem = key_error(key)
        if problem:
            errs.append(FieldError(path, "FieldValueInvalid", f"Invalid value: {_q(key)}: {problem}"))
        if not isinstance(value, str):
            errs.append(FieldError(f"{path}", "FieldValueInvalid", f"Invalid value: {_q(value)}: must be a string"))
            continue
        problem = value_error(value)
        if problem:
            errs.append(FieldError(path, "FieldValueInvalid", f"Invalid value: {_q(value)}: {problem}"))
    return errs


def validate_annotations(annotations, path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    if annotations is None:
        return errs
    total = 0
    for key, value in annotations.items():
        problem = key_error(key.lower())
        if problem:
            errs.append(FieldError(path, "FieldValueInvalid", f"Invalid value: {_q(key)}: {problem}"))
        if not isinstance(value, str):
            errs.append(FieldError(path, "FieldValueInvalid", f"Invalid value: {_q(value)}: must be a string"))
            continue
        total += len(key) + len(value)
    if total > 256 * 1024:
        errs.append(FieldError(path, "FieldValueTooLong", "Too long: must have at most 262144 bytes"))
    return errs


def validate_create(meta: dict, *, namespaced: bool, name_errors) -> list[FieldError]:
    """The ObjectMeta of a new object (after generateName was resolved)."""
    errs: list[FieldError] = []
    name = meta.get("name")
    if not name:
        errs.append(FieldError("metadata.name", "FieldValueRequired", "Required value: name or generateName is "
                               "required"))
    else:
        for problem in name_errors(name):
            errs.append(FieldError("metadata.name", "FieldValueInvalid", f"Invalid value: {_q(name)}: {problem}"))
    if meta.get("generateName"):
        for problem in name_errors(generate_name(meta["generateName"], random.Random(0))):
            errs.append(FieldError("metadata.generateName", "FieldValueInvalid",
                                   f"Invalid value: {_q(meta['generateName'])}: {problem}"))
    if namespaced and not meta.get("namespace"):
        errs.append(FieldError("metadata.namespace", "FieldValueRequired", "Required value"))
    errs += validate_common(meta)
    return errs


def validate_common(meta: dict) -> list[FieldError]:
    errs = validate_labels(meta.get("labels"), "metadata.labels")
    errs += validate_annotations(meta.get("annotations"), "metadata.annotations")
    finalizers = meta.get("finalizers") or []
    for i, fin in enumerate(finalizers):
        if not isinstance(fin, str) or key_error(fin):
            errs.append(FieldError(f"metadata.finalizers[{i}]", "FieldValueInvalid",
                                   f"Invalid value: {_q(fin)}: name part must consist of alphanumeric characters, "
                                   "'-', '_' or '.', and must start and end with an alphanumeric character"))
    if "orphan" in finalizers and "foregroundDeletion" in finalizers:
        errs.append(FieldError("metadata.finalizers", "FieldValueInvalid",
                               f"Invalid value: {_q(['orphan', 'foregroundDeletion'])}: finalizer orphan and "
                               "foregroundDeletion cannot be both set"))
    controllers = 0
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        where = "metadata.ownerReferences"
        if not isinstance(ref, dict):
            errs.append(FieldError(where, "FieldValueInvalid", "Invalid value: must be an object"))
            continue
        if not ref.get("apiVersion"):
            errs.append(FieldError(f"{where}.apiVersion", "FieldValueInvalid",
                                   'Invalid value: "": version must not be empty'))
        if not ref.get("kind"):
            errs.append(FieldError(f"{where}.kind", "FieldValueInvalid", 'Invalid value: "": kind must not be empty'))
        if not ref.get("name"):
            errs.append(FieldError(f"{where}.name", "FieldValueInvalid", 'Invalid value: "": name must not be empty'))
        if not ref.get("uid"):
            errs.append(FieldError(f"{where}.uid", "FieldValueInvalid", 'Invalid value: "": uid must not be empty'))
        if ref.get("controller"):
            controllers += 1
    if controllers > 1:
        errs.append(FieldError("metadata.ownerReferences", "FieldValueInvalid",
                               "Invalid value: []: Only one reference can have Controller set to true"))
    return errs


def validate_update(new: dict, old: dict) -> list[FieldError]:
    """Rules of ValidateObjectMetaUpdate (after the server restored the fields it owns)."""
    errs = validate_common(new)
    for key in ("name", "namespace", "uid"):
        if new.get(key) != old.get(key):
            errs.append(FieldError(f"metadata.{key}", "FieldValueInvalid",
                                   f"Invalid value: {_q(new.get(key))}: field is immutable"))
    if new.get("deletionTimestamp") != old.get("deletionTimestamp"):
        errs.append(FieldError("metadata.deletionTimestamp", "FieldValueInvalid",
                               f"Invalid value: {_q(new.get('deletionTimestamp'))}: field is immutable; may only "
                               "be changed via deletion"))
    if old.get("deletionTimestamp"):
        added = [f for f in new.get("finalizers") or [] if f not in (old.get("finalizers") or [])]
        if added:
            errs.append(FieldError("metadata.finalizers", "FieldValueForbidden",
                                   "Forbidden: no new finalizers can be added if the object is being deleted, "
                                   f"found new finalizers []string{{{', '.join(_q(a) for a in added)}}}"))
    return errs
