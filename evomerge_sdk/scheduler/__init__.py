"""The query scheduler: concurrency, RPM/TPM limits, a hard token/USD budget, retries, cache, metrics.

    async with Scheduler(max_concurrency=32, rpm=500, budget=Budget(usd=5.0), models=["gpt-4o-mini"]) as s:
        completion = await s.complete(provider, ChatRequest(model="gpt-4o-mini", messages="Hi"))

`Scheduler.call` runs any other billable call (for example a merge-service evaluation) under the same
budget, limits, retries, cache and metrics. See `_core` for the order of work and the guarantees, and
`RedisCoordination` for several workers sharing one key's limits, one budget and one cache through Redis.
"""

from __future__ import annotations

from ._budget import DEFAULT_PRICES, PRICES_AS_OF, Budget, BudgetLedger, ModelPrice, Price, PriceTable, Spend
from ._cache import CachedValue, ResponseCache, cache_key, chat_cache_key
from ._coordination import Coordination
from ._core import CallResult, Outcome, Scheduler
from ._limiter import RateLimiter, RateSchedule
from ._metrics import MetricsSnapshot, redact
from ._retry import RetryPolicy
from ._shared import RedisCoordination
from ._tokens import BYTES_ESTIMATE, TokenCounter, default_encoding_for, load_encoding

__all__ = [
    "BYTES_ESTIMATE",
    "DEFAULT_PRICES",
    "PRICES_AS_OF",
    "Budget",
    "BudgetLedger",
    "CachedValue",
    "CallResult",
    "Coordination",
    "MetricsSnapshot",
    "ModelPrice",
    "Outcome",
    "Price",
    "PriceTable",
    "RateLimiter",
    "RateSchedule",
    "RedisCoordination",
    "ResponseCache",
    "RetryPolicy",
    "Scheduler",
    "Spend",
    "TokenCounter",
    "cache_key",
    "chat_cache_key",
    "default_encoding_for",
    "load_encoding",
    "redact",
]
