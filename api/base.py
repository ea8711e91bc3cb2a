"""The base every API model derives from, and the CEL rules attached to models.

Cross-field rules are written once, in CEL, next to the model they constrain. The same expression is
emitted into the CRD (``x-kubernetes-validations``, enforced by the API server) and evaluated here by
``branchmerge.api.validation`` (enforced by ``branchmerge validate`` and the local runner), so the two
control planes can never disagree about what a valid manifest is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    """A CEL validation rule on the object of the model that declares it (``self`` is that object).

    ``field`` is the relative JSON path (``.models``) the error is reported at, like the CRD's
    ``fieldPath``; ``reason`` maps to the CRD's reason (FieldValueInvalid/Required/Forbidden).
    """

    rule: str
    message: str
    field: str | None = None
    reason: str = "FieldValueInvalid"


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=False,
        use_attribute_docstrings=True,
    )

    #: CEL rules for this object; see ``Rule``.
    rules: ClassVar[tuple[Rule, ...]] = ()

    def wire(self) -> dict:
        """The object as it is written in a manifest (aliases, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def walk(value: Any, path: str) -> Iterator[tuple[str, ApiModel]]:
    """Every API sub-object with its document path, parents first."""
    if isinstance(value, ApiModel):
        yield path, value
        for name, field in type(value).model_fields.items():
            child = getattr(value, name)
            alias = field.alias or name
            yield from walk(child, f"{path}.{alias}" if path else alias)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from walk(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, f"{path}.{key}")
