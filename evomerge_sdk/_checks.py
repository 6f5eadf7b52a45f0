"""The number checks every boundary of the SDK shares, so every bad value fails the same clear way."""

from __future__ import annotations

import math
from typing import TypeGuard

from .errors import ConfigError


def is_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> TypeGuard[int | float]:
    """An int or float that is not a bool (finite or not: the caller says what range it takes)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(
    name: str,
    value: object,
    *,
    strict: bool = True,
    integer: bool = False,
    allow_none: bool = False,
    unit: str = "",
) -> None:
    """Raise ConfigError unless `value` is a finite number > 0 (>= 0 unless `strict`), or None if allowed."""
    if value is None and allow_none:
        return
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    if ok:
        number = float(value)  # type: ignore[arg-type]  # isinstance above guarantees int or float
        ok = math.isfinite(number) and (number > 0 if strict else number >= 0)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        bound = "> 0" if strict else ">= 0"
        extra = f" ({unit})" if unit else ""
        none = " or None" if allow_none else ""
        raise ConfigError(f"{name} must be {kind} {bound}{extra}{none}, got {value!r}")
