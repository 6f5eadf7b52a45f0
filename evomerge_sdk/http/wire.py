"""Readers for fields of JSON answers: a wrong or missing field is a `BadResponse` naming its path.

Every adapter and the merge-service client read provider answers through these, so a malformed answer is
reported the same way whichever API sent it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ..errors import BadResponse

__all__ = ["field", "optional_field"]

_KindT = TypeVar("_KindT")


def optional_field(obj: Any, key: str, kind: type[_KindT], where: str) -> _KindT | None:
    """`obj[key]` checked to be a `kind` or null/absent; a `BadResponse` naming the path if not."""
    if not isinstance(obj, dict):
        raise BadResponse(f"{where} is not a JSON object")
    value = obj.get(key)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # type: ignore[return-value]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadResponse(f"{where}.{key} should be a {kind.__name__}, is a {type(value).__name__}")
    return value


def field(obj: Any, key: str, kind: type[_KindT], where: str) -> _KindT:
    """`obj[key]` checked to be a `kind`; a `BadResponse` naming the path if missing, null or mistyped."""
    value = optional_field(obj, key, kind, where)
    if value is None:
        raise BadResponse(f"{where}.{key} should be a {kind.__name__}, is missing or null")
    return value
