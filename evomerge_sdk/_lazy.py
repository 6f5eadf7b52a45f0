"""One home for lazy package attributes: a package's names load their module on first use, so importing
the package stays cheap (the root imports neither numpy nor aiohttp until a name needs them)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(
    package: str,
    names: Mapping[str, str],
    namespace: dict[str, Any],
    missing: Callable[[str], Any] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's `__getattr__` and `__dir__`: `names` maps each name to the (relative) module defining
    it; a loaded value is kept in `namespace` (the package's globals). `missing` answers other names
    (default: AttributeError)."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            if missing is not None:
                return missing(name)
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
