"""One home for the attrs validators and converters of settings: composable checks that name the field.

@attrs.frozen
class Config:
    workers: int = attrs.field(default=2, validator=positive_int)
    out_dir: Path = attrs.field(default="out", converter=as_path, validator=folder)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from ._checks import check_number
from .errors import ConfigError

__all__ = ["as_path", "folder", "non_negative_int", "optional_path", "optional_positive_int", "positive_int"]


def positive_int(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """An integer >= 1 (not a bool)."""
    check_number(attribute.name, value, integer=True)


def non_negative_int(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """An integer >= 0 (not a bool)."""
    check_number(attribute.name, value, integer=True, strict=False)


def optional_positive_int(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """None or an integer >= 1."""
    check_number(attribute.name, value, integer=True, allow_none=True)


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
