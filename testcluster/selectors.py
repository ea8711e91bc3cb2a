"""Label and field selectors as kube-apiserver parses and applies them (``?labelSelector=``, ``?fieldSelector=``).

Label selectors: ``k=v``, ``k==v``, ``k!=v`` (also true when the label is absent), ``k in (a,b)``,
``k notin (a,b)`` (true when absent), ``k`` (exists), ``!k`` (does not exist), comma-separated = AND;
keys and values are checked for label syntax. Field selectors: ``f=v``, ``f==v``, ``f!=v`` over the fields
each kind supports (``testcluster.builtins``); an unsupported field is a 400 as on the real server.

Not emulated: the ``>``/``<`` label operators (integer comparisons; answered 400 here), escaping in field
selector values (``\\,``, ``\\=``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class SelectorError(ValueError):
    """Answered as 400 BadRequest."""


def key_error(key: str) -> str | None:
    """Why ``key`` is not a valid label key (qualified name), or None."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"prefix part must be a lowercase RFC 1123 subdomain: {key!r}"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')")
    return None


def value_error(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _LABEL_VALUE.match(value):
        return ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
                "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
                "'12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")
    return None


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset

    def matches(self, labels: dict) -> bool:
        has = self.key in labels
        if self.op == "=":
            return has and labels[self.key] in self.values
        if self.op == "in":
            return has and labels[self.key] in self.values
        if self.op in ("!=", "notin"):
            return not has or labels[self.key] not in self.values
        if self.op == "exists":
            return has
        return not has  # "!"


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


_SET = re.compile(r"^\s*(\S+)\s+(in|notin)\s*\((.*)\)\s*$")


def parse_labels(text: str | None) -> list[Requirement]:
    if not text or not text.strip():
        return []
    out = []
    for part in _split_top(text):
        part = part.strip()
        if not part:
            raise SelectorError("unable to parse requirement: found '', expected: identifier")
        match = _SET.match(part)
        if match:
            key, op, values = match.group(1), match.group(2), frozenset(
                v.strip() for v in match.group(3).split(",") if v.strip())
        elif "!=" in part:
            key, _, value = part.partition("!=")
            key, op, values = key.strip(), "!=", frozenset([value.strip()])
        elif "==" in part:
            key, _, value = part.partition("==")
            key, op, values = key.strip(), "=", frozenset([value.strip()])
        elif "=" in part:
            key, _, value = part.partition("=")
            key, op, values = key.strip(), "=", frozenset([value.strip()])
        elif part.startswith("!"):
            key, op, values = part[1:].strip(), "!", frozenset()
        elif re.search(r"[<>()\s]", part):
            raise SelectorError(f"unable to parse requirement: {part!r}: unsupported operator")
        else:
            key, op, values = part, "exists", frozenset()
        problem = key_error(key)
        if problem:
            raise SelectorError(f"unable to parse requirement: invalid label key {key!r}: {problem}")
        for value in values:
            problem = value_error(value)
            if problem:
                raise SelectorError(f"unable to parse requirement: invalid label value: {value!r}: {problem}")
        out.append(Requirement(key, op, values))
    return out


def parse_fields(text: str | None, supported: Callable[[str], bool]) -> list[tuple[str, str, str]]:
    """[(field, op, value)]; raises SelectorError for bad syntax or an unsupported field."""
    if not text or not text.strip():
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        for op in ("!=", "==", "="):
            if op in part:
                name, _, value = part.partition(op)
                op = "=" if op == "==" else op
                break
        else:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{part}'")
        name = name.strip()
        if not supported(name):
            raise SelectorError(f'field label not supported: {name}')
        out.append((name, op, value.strip()))
    return out


def labels_match(reqs: list[Requirement], obj: dict) -> bool:
    if not reqs:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(r.matches(labels) for r in reqs)


def fields_match(reqs: list[tuple[str, str, str]], values: dict[str, str]) -> bool:
    for name, op, value in reqs:
        actual = values.get(name, "")
        if (actual == value) != (op == "="):
            return False
    return True
