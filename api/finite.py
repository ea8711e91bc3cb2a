"""JSON as Kubernetes accepts it: no NaN or Infinity. Python's json module reads and writes them, but
kube-apiserver answers 400 to a body holding one, so a non-finite metric copied into a CR's status would
fail every later status write of that CR. Non-finite numbers become null (the metric is unknown)."""
from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def loads(text: str | bytes) -> Any:
    """``json.loads`` reading NaN / Infinity / -Infinity (which an older stage may have written) as None."""
    return json.loads(text, parse_constant=lambda _: None)
