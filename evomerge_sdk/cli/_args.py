"""What every subcommand shares: argument types, the `cli` extra check, the API-key variable."""

from __future__ import annotations

import argparse
import importlib.util

from ..errors import CLI_EXTRA_HINT, ConfigError

API_KEY_ENV = "EVOMERGE_API_KEY"


def require_cli_extra(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"this command needs {', '.join(missing)}: {CLI_EXTRA_HINT}")


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
