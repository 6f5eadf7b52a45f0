"""The SDK's loggers: structlog events delivered through the standard library's `logging`.

A library must not print into an application that never asked for it, and must obey the application's
logging set-up. So, until the application configures structlog, every SDK event is rendered by
structlog (`event key=value ...`) and handed to the `logging` logger of its module
(`evomerge_sdk.scheduler`, `evomerge_sdk.merged.server`, ...): structlog's stdlib integration. `logging`
configuration then controls everything the SDK prints: levels, handlers, formats
(`logging.getLogger("evomerge_sdk").setLevel(logging.CRITICAL)` or `logging.basicConfig(level=...)`
silences it). With no configuration at all, Python's last-resort handler prints warnings and errors to
stderr, and debug and info events are dropped.

An application that configures structlog itself (`structlog.configure(...)`) receives the events
through its own configuration instead, with their fields intact (`structlog.testing.capture_logs`
sees them too).

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
_RENDER = structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True)


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
    """A structlog logger by name whose events go to `logging` unless the application configured
    structlog (see the module doc)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stdlib = structlog.wrap_logger(
            logging.getLogger(name),
            processors=[structlog.stdlib.filter_by_level, _RENDER],
            wrapper_class=structlog.stdlib.BoundLogger,
        )

    def _emit(self, method: str, event: str, fields: dict[str, Any]) -> None:
        if _SECRETS:
            fields = {k: _masked(v) for k, v in fields.items()}
        if structlog.is_configured():
            getattr(structlog.get_logger(self.name), method)(event, **fields)
        else:
            getattr(self._stdlib, method)(event, **fields)

    def is_enabled_for(self, level: int) -> bool:
        """Whether an event at `level` would go anywhere (so a caller can skip building costly ones)."""
        if not structlog.is_configured():
            return logging.getLogger(self.name).isEnabledFor(level)
        bound = structlog.get_logger(self.name).bind()
        check = getattr(bound, "is_enabled_for", None) or getattr(bound, "isEnabledFor", None)
        return True if check is None else bool(check(level))

    def debug(self, event: str, **fields: Any) -> None:
        """A per-request detail."""
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """A routine event (a server started, a scheduler closed)."""
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Something the user should know about."""
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """A failure."""
        self._emit("error", event, fields)


def get_logger(name: str) -> QuietLogger:
    """The SDK logger for `name` (see the module doc)."""
    return QuietLogger(name)
