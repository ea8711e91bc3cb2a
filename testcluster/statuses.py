"""Failure answers of the API server stand-in: the ``Status`` object kube-apiserver sends with a 4xx/5xx, and
the strict JSON decoding that produces the 400s (NaN and Infinity are not JSON)."""
from __future__ import annotations

import json
from typing import Any

from .resources import ResourceType
from .schema import FieldError



class StatusError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}
        self.headers = headers or {}

    def body(self) -> dict:
        out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
               "reason": self.reason, "code": self.code}
        if self.details:
            out["details"] = self.details
        return out


def _details(rt: ResourceType, name: str | None, **extra) -> dict:
    out = {"name": name or "", "group": rt.group, "kind": rt.plural}
    out.update(extra)
    return {k: v for k, v in out.items() if v != "" or k == "name"}


def not_found(rt: ResourceType, name: str) -> StatusError:
    return StatusError(404, "NotFound", f'{rt.qualified} "{name}" not found', _details(rt, name))


def conflict(rt: ResourceType, name: str) -> StatusError:
    return StatusError(409, "Conflict", f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has '
                       "been modified; please apply your changes to the latest version and try again",
                       _details(rt, name))


def bad_request(message: str) -> StatusError:
    return StatusError(400, "BadRequest", message)


def invalid(rt: ResourceType, name: str, errors: list[FieldError]) -> StatusError:
    text = "; ".join(str(e) for e in errors) if False else ", ".join(str(e) for e in errors)
    message = f'{rt.qualified_kind()} "{name}" is invalid: ' + (text if len(errors) == 1 else f"[{text}]")
    details = {"name": name, "group": rt.group, "kind": rt.kind, "causes": [e.cause() for e in errors]}
    return StatusError(422, "Invalid", message, {k: v for k, v in details.items() if v != ""})


def _reject_constant(token: str):
    raise ValueError(f"invalid JSON number {token}")


def decode_json(body: bytes) -> Any:
    """JSON only; NaN/Infinity (which Python's json accepts) are not JSON."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"error decoding JSON body: {err}") from None
