"""One hierarchy for every error the SDK raises.

    EvomergeError                  every error the SDK raises on purpose
    ├── ConfigError (ValueError)   a bad setting, argument or input, refused before any work starts
    ├── UsageError (RuntimeError)  a call at the wrong time: a resource not opened yet, or closed
    ├── BudgetExceeded             the hard budget cannot cover the next request (nothing was sent)
    ├── StorageError (OSError)     a file the SDK keeps could not be written (disk full, read-only,
    │                              a value SQLite cannot hold); names the file
    ├── CoordinationLost           the shared coordinator (Redis) went away mid-run (nothing more is sent)
    └── ProviderError              a call to a model API failed (`status`, `rate_limits`)
        ├── AuthenticationError    401/403: never retried
        ├── InvalidRequest         400/404/422 or a spend limit: never retried
        └── RetryableError         may succeed if sent again later
            ├── RateLimited        429 (`retry_after`)
            ├── ServerError        5xx
            ├── RequestTimeout     no complete answer in time (`Timeout` is its deprecated old name)
            ├── ConnectionFailed   no connection, or dropped before a full answer
            └── BadResponse        an answer that cannot be parsed

Adapters map their wire-level failures onto these types, so the scheduler can decide what to retry
without knowing which API it talks to. Retryable errors derive from `RetryableError`; everything else
is final.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .providers import RateLimitInfo

__all__ = [
    "AuthenticationError",
    "BadResponse",
    "BudgetExceeded",
    "ConfigError",
    "ConnectionFailed",
    "CoordinationLost",
    "EvomergeError",
    "InvalidRequest",
    "ProviderError",
    "RateLimited",
    "RequestTimeout",
    "RetryableError",
    "ServerError",
    "StorageError",
    "UsageError",
]

CLI_EXTRA_HINT = "pip install 'evomerge-sdk[cli]'"
"""How to get the optional CLI dependencies (rich, matplotlib); error messages that need them end with it."""


class EvomergeError(Exception):
    """Base of every error the SDK raises on purpose."""


class ConfigError(EvomergeError, ValueError):
    """A setting, argument or input is invalid; raised at the boundary, before any work starts."""


class UsageError(EvomergeError, RuntimeError):
    """The SDK was used in the wrong order: a resource used before it was opened or after it was closed,
    or an ask/tell step out of turn. Fix the calling code; no setting makes it right."""


class StorageError(EvomergeError, OSError):
    """A file the SDK keeps (response cache, checkpoint, materialized merge) could not be written. The
    message names the file; nothing already there was damaged by the failed write."""


class ProviderError(EvomergeError):
    """A call to a model API failed."""

    def __init__(
        self, message: str, *, status: int | None = None, rate_limits: RateLimitInfo | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        # What the API said about its limits along with the failure; the scheduler adopts it.
        self.rate_limits = rate_limits


class RetryableError(ProviderError):
    """A failure that may go away if the same request is sent again later."""


class RateLimited(RetryableError):
    """The API answered 429 (or an equivalent); `retry_after` is its hint in seconds, if it gave one."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = 429,
        rate_limits: RateLimitInfo | None = None,
    ) -> None:
        super().__init__(message, status=status, rate_limits=rate_limits)
        self.retry_after = retry_after


class ServerError(RetryableError):
    """The API answered with a 5xx status (or an 'overloaded' equivalent)."""


class RequestTimeout(RetryableError):
    """No complete answer arrived within the per-request timeout."""


class ConnectionFailed(RetryableError):
    """The connection could not be made or was dropped before a full answer arrived."""


class BadResponse(RetryableError):
    """The answer arrived but could not be parsed (malformed JSON, missing fields, wrong types)."""


class AuthenticationError(ProviderError):
    """The API rejected the credentials (401/403). Never retried."""


class InvalidRequest(ProviderError):
    """The API rejected the request itself (400/404/422, or a spend limit reached). Never retried."""


class BudgetExceeded(EvomergeError):
    """The hard budget cannot cover the next request; nothing was sent for it.

    `spent` holds what was spent so far, so callers can report it and stop cleanly.
    """

    def __init__(self, message: str, *, spent: Any = None) -> None:
        super().__init__(message)
        self.spent = spent


class CoordinationLost(EvomergeError):
    """The shared coordinator (Redis, see `RedisCoordination`) stopped answering, or lost its state.

    Raised mid-run instead of sending a request that the shared budget and limits could not cover; a
    search stops on it like on `BudgetExceeded`, with its resumable checkpoint. Not retried: once lost,
    the coordination stays lost until a new scheduler is opened. (An unreachable coordinator at start
    is a `ConfigError`.)
    """


_DEPRECATED = {"Timeout": ("RequestTimeout", RequestTimeout)}
"""Old names kept for one minor version (0.2): they shadowed a builtin. See CHANGELOG.md."""


def deprecated_alias(module: str, name: str, stacklevel: int = 3) -> Any:
    """The value of an old name of `module`, with a DeprecationWarning naming the new one; AttributeError
    for a name that was never there. The root package and this module share it."""
    if name not in _DEPRECATED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new, value = _DEPRECATED[name]
    warnings.warn(
        f"{module}.{name} is deprecated; use {new} (the old name goes in 0.3)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return value


def __getattr__(name: str) -> Any:
    """Old names still resolve, with a DeprecationWarning naming the new one."""
    return deprecated_alias(__name__, name)
