"""One home for the attrs validators and converters of settings: composable checks that name the field.

@attrs.frozen
class Config:
    workers: int = attrs.field(default=2, validator=positive_int)
    out_dir: Path = attrs.field(default="out", converter=as_path, validator=folder)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from ._checks import check_number, is_int
from .errors import ConfigError

__all__ = [
    "as_path",
    "folder",
    "integer",
    "must",
    "non_negative_int",
    "number",
    "optional_path",
    "optional_positive_int",
    "positive_int",
    "probability",
]

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def number(
    *,
    strict: bool = True,
    integer: bool = False,
    allow_none: bool = False,
    unit: str = "",
    prefix: str = "",
) -> Validator:
    """A finite number > 0 (>= 0 unless `strict`; an int if `integer`; None if `allow_none`)."""

    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        check_number(
            prefix + attribute.name, value, strict=strict, integer=integer, allow_none=allow_none, unit=unit
        )

    return check


def probability(*, prefix: str = "") -> Validator:
    """A number in [0, 1]."""
    at_least_zero = number(strict=False, prefix=prefix)

    def check(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        at_least_zero(inst, attribute, value)
        if value > 1:
            raise ConfigError(f"{prefix}{attribute.name} is a probability in [0, 1], got {value!r}")

    return check


def must(test: Callable[[Any], bool], message: str) -> Validator:
    """Refuse a value `test` rejects with ConfigError(`message`), formatted with the field's `name` and
    `value`: one composable check for the settings whose messages say more than `number` can."""

    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not test(value):
            raise ConfigError(message.format(name=attribute.name, value=value))

    return check


def integer(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """Any integer (not a bool), negative ones too: a seed."""
    if not is_int(value):
        raise ConfigError(f"{attribute.name} must be an integer, got {value!r}")


positive_int = number(integer=True)
"""An integer >= 1 (not a bool)."""
non_negative_int = number(integer=True, strict=False)
"""An integer >= 0 (not a bool)."""
optional_positive_int = number(integer=True, allow_none=True)
"""None or an integer >= 1."""


def folder(_: object, attribute: attrs.Attribute[Any], value: Path | None) -> None:
    """None, a folder, or a path not yet taken (refused at once if a file is there)."""
    if value is not None and value.exists() and not value.is_dir():
        raise ConfigError(f"{attribute.name} {str(value)!r} is a file, not a folder")


def as_path(value: str | Path) -> Path:
    """A Path from a str or path-like; ConfigError for anything else."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"expected a folder or file path, got {value!r:.60}")
    return Path(value)


def optional_path(value: str | Path | None) -> Path | None:
    """None stays None; anything else becomes a Path."""
    return None if value is None else as_path(value)
