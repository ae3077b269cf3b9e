"""Coder-style JSON error responses.

Every API error is ``{"message": str, "detail": str, "validations": [{"field", "detail"}]}``
(Coder's ``codersdk.Response``) with a 4xx/5xx status. Handlers raise
:class:`HttpError`; the server turns it into a response in one place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Validation", "HttpError", "error_body"]


@dataclass(frozen=True, slots=True)
class Validation:
    """One field-level problem (``validations[]`` entry)."""

    field: str
    detail: str


@dataclass(slots=True)
class HttpError(Exception):
    """An API error; ``message``/``detail`` are safe to show the caller."""

    status: int
    message: str
    detail: str = ""
    validations: Sequence[Validation] = field(default_factory=tuple)

    def __str__(self) -> str:
        return f"{self.status} {self.message}"

    def body(self) -> bytes:
        return error_body(self.message, self.detail, self.validations)


def error_body(message: str, detail: str = "", validations: Sequence[Validation] = ()) -> bytes:
    """The JSON body of an error response."""
    doc = {
        "message": message,
        "detail": detail,
        "validations": [{"field": v.field, "detail": v.detail} for v in validations],
    }
    return json.dumps(doc).encode("utf-8")
