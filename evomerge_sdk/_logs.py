"""The SDK's loggers: structlog, quiet below WARNING until the application configures structlog.

structlog's unconfigured default prints every event, debug included, to stdout. A library must not
write its routine events into an application that never asked for them, so `debug` and `info` events
are dropped until `structlog.configure(...)` has been called (the `evomerge` CLI does); warnings and
errors always go out.

Every credential the SDK is configured with (`register_secret`: each provider's API key, each server's
bearer key) is masked in every event these loggers emit and by `mask_secrets`, whatever its shape: an
Azure key is 32 hex digits, a gateway's key anything at all, so no pattern can find them all.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["get_logger", "mask_secrets", "register_secret"]

_SECRETS: set[str] = set()
_MASKED = "***"


def register_secret(secret: str) -> None:
    """Mask `secret` from now on in every SDK log event and in `mask_secrets` (process-wide)."""
    if len(secret) >= 4:  # a shorter "key" would mask ordinary words in every message
        _SECRETS.add(secret)


def mask_secrets(text: str) -> str:
    """`text` with every registered secret replaced by '***' (longest first, so no part survives)."""
    if not _SECRETS:
        return text
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, _MASKED)
    return text


def _masked(value: Any) -> Any:
    return mask_secrets(value) if isinstance(value, str) else value


class QuietLogger:
    """A structlog logger by name whose routine events wait for the application's configuration."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _emit(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if level < logging.WARNING and not structlog.is_configured():
            return
        if _SECRETS:
            fields = {k: _masked(v) for k, v in fields.items()}
        getattr(structlog.get_logger(self.name), method)(event, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        """A per-request detail."""
        self._emit(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """A routine event (a server started, a scheduler closed)."""
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Something the user should know about; always emitted."""
        self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """A failure; always emitted."""
        self._emit(logging.ERROR, "error", event, fields)


def get_logger(name: str) -> QuietLogger:
    """The SDK logger for `name` (see the module doc)."""
    return QuietLogger(name)
