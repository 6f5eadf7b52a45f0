"""What a Scheduler needs from its limiter, budget ledger and response cache, and who can provide them.

The in-process objects (`RateLimiter`, `BudgetLedger`, `ResponseCache`) are one implementation: one
scheduler, one event loop, no I/O on the hot path. `RedisCoordination` is the other: every worker that
uses the same Redis namespace shares one rate limit, one hard budget and one cache. The scheduler takes
either (`Scheduler(shared=RedisCoordination(...))`) and calls the same methods on both, so the order of
work and the budget rules of `_core` hold unchanged when several processes share one API key.

Methods that the scheduler calls synchronously (`observe`, `pause`, `settle`, `release`, `put`, ...)
must not block: a networked implementation queues them and applies them in order, shortly after.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..providers import RateLimitInfo, Usage
from ._budget import Budget, Reservation, Spend
from ._cache import CachedValue

__all__ = ["Coordination", "Ledger", "Limiter", "ResultCache"]


class Limiter(Protocol):
    """An RPM/TPM limiter: `acquire` waits for a start slot; the API's headers and 429s adjust it."""

    @property
    def active(self) -> bool:
        """Whether `acquire` may have to wait (a limit is set, or a pause was asked for)."""

    @property
    def rpm(self) -> float | None:
        """Effective requests per minute (None: unlimited)."""

    @property
    def tpm(self) -> float | None:
        """Effective tokens per minute (None: unlimited)."""

    def set_limits(self, *, rpm: float | None, tpm: float | None) -> None:
        """Change the configured ceilings."""

    def observe(self, info: RateLimitInfo) -> None:
        """Adopt what the API's rate-limit headers say (never below `RateLimiter.MIN_RPM`/`MIN_TPM`)."""

    def pause(self, seconds: float) -> None:
        """Start nothing for `seconds` (a 429's Retry-After), at most the limiter's `max_pause`."""

    async def acquire(self, tokens: int, *, max_wait: float | None = None) -> None:
        """Wait until a request of `tokens` may start; RequestTimeout at once for a start past `max_wait`."""


class Ledger(Protocol):
    """The hard budget: worst cases reserved before sending, settled, released or charged after."""

    budget: Budget | None

    @property
    def limited(self) -> bool:
        """Whether any limit is enforced."""

    def spend(self) -> Spend:
        """Spend and reservations so far."""

    def try_reserve(
        self,
        tokens: int,
        pico: int,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        input_ceiling: int | None = None,
    ) -> Reservation | None:
        """Reserve without waiting, or None when `reserve` must be awaited (keywords: see BudgetLedger)."""

    async def reserve(
        self,
        tokens: int,
        pico: int,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        input_ceiling: int | None = None,
    ) -> Reservation:
        """Reserve a worst case, waiting while requests in flight hold the room (BudgetExceeded if never)."""

    def release(self, res: Reservation) -> None:
        """Nothing was spent: free the room."""

    def charge_reserved(self, res: Reservation) -> None:
        """The outcome is unknown: spend the whole reservation."""

    def settle(self, res: Reservation, usage: Usage | None, pico: int) -> bool:
        """Spend the actual usage; False when it exceeded the reservation. None: an unknown outcome,
        charged the reservation; an impossible usage is charged the reservation and raises BadResponse."""


class ResultCache(Protocol):
    """Results by key, with a fast in-memory answer and a slower store behind it."""

    async def open(self) -> None:
        """Make the store usable."""

    async def aclose(self) -> None:
        """Write what is pending and close the store."""

    async def flush(self) -> None:
        """Wait until everything stored so far is durable."""

    def get(self, key: str) -> CachedValue | None:
        """A hit known without I/O."""

    def on_disk(self, key: str) -> bool:
        """Whether `load` might find `key` (True when only the store can tell)."""

    async def load(self, key: str, check: Callable[[Any], bool] | None = None) -> CachedValue | None:
        """A hit from the store (a damaged one, or one `check` refuses, is a miss); a miss may make this
        caller the one that computes `key` everywhere."""

    def put(self, key: str, value: Any, usage: Usage) -> None:
        """Store a result."""

    def abandon(self, key: str) -> None:
        """The call for `key` ended without a result: let another caller compute it."""


class Coordination(Protocol):
    """A provider of limiters, a ledger and a cache that several schedulers (or processes) share."""

    async def open(self) -> None:
        """Connect (ConfigError when the coordinator cannot be reached)."""

    async def aclose(self) -> None:
        """Apply what is queued and disconnect."""

    def limiter(self, scope: str, rpm: float | None, tpm: float | None, *, max_pause: float) -> Limiter:
        """The limiter for `scope` ("*" for all models, else a model name); pauses last <= `max_pause` s."""

    def ledger(self, budget: Budget | None) -> Ledger:
        """The shared budget ledger."""

    def cache(self) -> ResultCache:
        """The shared response cache."""
