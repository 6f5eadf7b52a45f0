"""One validator for the numeric settings of the scheduler, so every bad value fails the same clear way."""

from __future__ import annotations

import math

from ..errors import ConfigError


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
