"""The walls between the package's rooms (DESIGN 2), checked by parsing every module's imports.

Product code never imports the demo, the CLI or a test double; the engine knows no HTTP and no
scheduler; the scheduler knows nothing of merging. Imports inside functions and under TYPE_CHECKING
count too: a wall that holds only at import time is not a wall.
"""

from __future__ import annotations

import ast
from pathlib import Path

import evomerge_sdk

PACKAGE = Path(evomerge_sdk.__file__).resolve().parent

# The one-home helpers every room may use.
HELPERS = {"_checks", "_validators", "_io", "_types", "_logs", "_lazy", "_concurrency", "errors"}
PRODUCT = {
    "errors",
    "providers",
    "http",
    "scheduler",
    "engine",
    "objectives",
    "service",
    "merged",
    "local",
    "report",
}
# room -> the other rooms it may import (besides HELPERS).
ALLOWED: dict[str, set[str]] = {
    "_checks": set(),
    "_validators": set(),
    "_io": set(),
    "_types": set(),
    "_logs": set(),
    "_lazy": set(),
    "_concurrency": set(),
    "errors": {"providers"},  # for a type annotation only
    "providers": set(),
    "http": {"providers"},
    "scheduler": {"providers"},
    "engine": set(),
    "service": {"engine", "http", "providers", "scheduler"},
    "objectives": {"engine", "providers", "scheduler", "service"},
    "local": {"engine", "http", "objectives", "service"},  # service: the reference protocol's defaults
    "merged": {"engine", "http", "local", "objectives", "providers", "scheduler", "service"},
    "report": {"engine"},  # any search result as a PNG and a table
    "testing": PRODUCT,
    "demo": PRODUCT,
    "cli": PRODUCT | {"demo"},
    "__init__": PRODUCT,
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Every evomerge_sdk module `path` imports, relative imports resolved."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    module = ".".join(rel.parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("evomerge_sdk.") and _is_module(m)}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def test_every_room_imports_only_what_its_wall_allows() -> None:
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        room = _room(".".join(rel.parts))
        assert room in ALLOWED, f"{path}: a new room; say what it may import in ALLOWED"
        for target in _imports(path):
            other = _room(target)
            if other != room and other not in HELPERS and other not in ALLOWED[room]:
                broken.append(f"{rel}: imports {target}")
    assert not broken, "\n".join(broken)


def test_product_code_imports_no_demo_cli_or_test_double() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if _room(".".join(rel.parts)) in PRODUCT:
            bad = {t for t in _imports(path) if _room(t) in {"demo", "cli", "testing"}}
            assert not bad, f"{rel} imports {sorted(bad)}"


def test_the_root_exports_the_product_only() -> None:
    for name in evomerge_sdk.__all__:
        module = getattr(getattr(evomerge_sdk, name), "__module__", "evomerge_sdk") or "evomerge_sdk"
        assert _room(module) not in {"demo", "cli", "testing", "local"}, (name, module)
    for gone in ("LocalService", "DemoConfig", "run_demo", "EchoServer", "SyntheticPool", "LocalObjective"):
        assert gone not in evomerge_sdk.__all__
        assert not hasattr(evomerge_sdk, gone), gone
