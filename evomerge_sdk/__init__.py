"""evomerge-sdk: black-box merging of LLMs reachable only through APIs (Evo-Merging).

The package root re-exports the public surface. Heavy parts (numpy, aiohttp) load on first use, so
`import evomerge_sdk` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AuthenticationError,
    BadResponse,
    BudgetExceeded,
    ConfigError,
    ConnectionFailed,
    EvomergeError,
    InvalidRequest,
    ProviderError,
    RateLimited,
    RetryableError,
    ServerError,
    Timeout,
)
from .providers import (
    ChatRequest,
    Completion,
    Message,
    Provider,
    RateLimitInfo,
    TokenLogprob,
    Usage,
    available_providers,
    load_provider,
)

__version__ = "0.1.0"

# name -> submodule that defines it; imported on first attribute access.
_LAZY: dict[str, str] = {}

if TYPE_CHECKING:
    pass


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'evomerge_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AuthenticationError",
    "BadResponse",
    "BudgetExceeded",
    "ChatRequest",
    "Completion",
    "ConfigError",
    "ConnectionFailed",
    "EvomergeError",
    "InvalidRequest",
    "Message",
    "Provider",
    "ProviderError",
    "RateLimitInfo",
    "RateLimited",
    "RetryableError",
    "ServerError",
    "Timeout",
    "TokenLogprob",
    "Usage",
    "available_providers",
    "load_provider",
    *_LAZY,
]
