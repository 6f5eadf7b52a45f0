"""The hard budget: tokens and USD, reserved at their worst case before a request is sent.

Every request reserves its worst case (prompt tokens + max output tokens, priced as uncached input and
full output) before it is sent, and settles to its actual usage when the answer arrives. The check is
`spent + reserved + worst case <= limit`, so the limit holds even with hundreds of requests in flight.
When a request does not fit only because others are still in flight, it waits for them to settle (they
usually spend less than they reserved); when it cannot fit even then, it gets `BudgetExceeded`.

A request whose outcome is unknown (timeout, dropped connection, malformed answer, cancellation after it
was sent, an answer that reports no usage) is charged its full reservation: the API may well have billed
it, and the budget is hard.

What an answer reports is checked before it is spent (`BudgetLedger.settle`; a shared backend such as
Redis applies the same rules): a count that is not a non-negative integer or exceeds
`MAX_REPORTED_TOKENS`, output beyond the reserved maximum, or input beyond `input_ceiling` (the prompt's
UTF-8 bytes plus framing: no byte-level tokenizer can count more) is impossible. Such an answer is charged
its reservation and refused with `BadResponse` (never cached). Input beyond the counted estimate but
within the ceiling is a tokenizer difference (tiktoken's count for another vendor's model): it is spent
as reported and counted as a reservation overrun.

Money is kept in integer picodollars (1e-12 USD), prices rounded up, so sums are exact and never drift
below the truth.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from types import MappingProxyType

import anyio
import attrs

from .._validators import number
from ..errors import BadResponse, BudgetExceeded, ConfigError
from ..providers import Usage

__all__ = [
    "DEFAULT_PRICES",
    "MAX_REPORTED_TOKENS",
    "PRICES_AS_OF",
    "Budget",
    "BudgetLedger",
    "Price",
    "PriceTable",
    "Reservation",
    "Spend",
]

_PICO_PER_USD = 10**12

MAX_REPORTED_TOKENS = 10**9
"""No single request reads or writes this many tokens; a usage report above it is a broken or hostile
server (and 1e320 tokens would overflow every float the spend is reported in)."""


_PRICE = number(strict=False, unit="USD per 1M tokens", prefix="Price.")
_OPTIONAL_PRICE = number(strict=False, allow_none=True, unit="USD per 1M tokens", prefix="Price.")


@attrs.frozen
class Price:
    """A model's list price in USD per 1M tokens; `cached_input` defaults to the input price."""

    input: float = attrs.field(validator=_PRICE)
    output: float = attrs.field(validator=_PRICE)
    cached_input: float | None = attrs.field(default=None, validator=_OPTIONAL_PRICE)

    def pico_per_token(self) -> tuple[int, int, int]:
        """(input, output, cached input) in picodollars per token, rounded up."""

        def conv(usd_per_mtok: float) -> int:
            # USD per 1e6 tokens -> 1e12 pico per 1e6 tokens = 1e6 pico per token per USD/Mtok
            return int((Decimal(str(usd_per_mtok)) * 10**6).to_integral_value(ROUND_CEILING))

        cached = self.input if self.cached_input is None else self.cached_input
        return conv(self.input), conv(self.output), conv(cached)


PRICES_AS_OF = "2025-06"
# List prices (USD per 1M tokens) as published by the vendors around PRICES_AS_OF. A convenience only:
# prices change, so pass your own with `prices=` when the budget matters.
DEFAULT_PRICES: Mapping[str, Price] = MappingProxyType(
    {
        "gpt-4o": Price(2.50, 10.00, 1.25),
        "gpt-4o-mini": Price(0.15, 0.60, 0.075),
        "gpt-4.1": Price(2.00, 8.00, 0.50),
        "gpt-4.1-mini": Price(0.40, 1.60, 0.10),
        "gpt-4.1-nano": Price(0.10, 0.40, 0.025),
        "o3-mini": Price(1.10, 4.40, 0.55),
        "o4-mini": Price(1.10, 4.40, 0.275),
        "gpt-3.5-turbo": Price(0.50, 1.50),
        "claude-3-haiku": Price(0.25, 1.25, 0.03),
        "claude-3-5-haiku": Price(0.80, 4.00, 0.08),
        "claude-3-5-sonnet": Price(3.00, 15.00, 0.30),
        "claude-3-7-sonnet": Price(3.00, 15.00, 0.30),
        "claude-sonnet-4": Price(3.00, 15.00, 0.30),
        "claude-opus-4": Price(15.00, 75.00, 1.50),
    }
)

# Dated snapshots share their family's price: gpt-4o-2024-08-06, claude-3-5-haiku-20241022, ...-latest.
_SNAPSHOT_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")


class PriceTable:
    """Model -> `Price`: the user's prices first, then (unless `defaults=False`) `DEFAULT_PRICES`.

    Lookup is by exact name, then by the name without a dated snapshot suffix; never by a looser prefix,
    because charging "gpt-4o-mini-tts" at "gpt-4o-mini" prices could break a hard budget.
    """

    def __init__(self, prices: Mapping[str, Price] | None = None, *, defaults: bool = True) -> None:
        table: dict[str, Price] = dict(DEFAULT_PRICES) if defaults else {}
        if prices is not None and not isinstance(prices, Mapping):
            raise ConfigError(f"prices must map model names to Price(...), got {type(prices).__name__}")
        for model, price in (prices or {}).items():
            if not isinstance(model, str) or not model:
                raise ConfigError(f"price table keys must be model names, got {model!r}")
            if not isinstance(price, Price):
                raise ConfigError(f"price for {model!r} must be a Price(input=..., output=...): {price!r}")
            table[model] = price
        self._table = table

    def get(self, model: str) -> Price | None:
        """The price of `model`, or None when the table has none."""
        price = self._table.get(model)
        if price is None:
            base = _SNAPSHOT_SUFFIX.sub("", model)
            if base != model:
                price = self._table.get(base)
        return price

    def require(self, model: str) -> Price:
        """The price of `model`, or a ConfigError that says how to supply one."""
        price = self.get(model)
        if price is None:
            raise ConfigError(
                f"no price for model {model!r}; a USD budget needs one: "
                f"pass prices={{{model!r}: Price(input=..., output=...)}} (USD per 1M tokens)"
            )
        return price


@attrs.frozen
class Budget:
    """A hard cap on total tokens (input + output) and/or USD for everything a scheduler sends."""

    tokens: int | None = attrs.field(
        default=None, validator=number(integer=True, allow_none=True, prefix="Budget.")
    )
    usd: float | None = attrs.field(default=None, validator=number(allow_none=True, prefix="Budget."))

    def __attrs_post_init__(self) -> None:
        """Cross-field invariant: at least one of the two caps."""
        if self.tokens is None and self.usd is None:
            raise ConfigError("a Budget needs tokens=..., usd=... or both (pass budget=None for no cap)")


@attrs.frozen
class Spend:
    """What was spent (settled) so far, and what is reserved by requests in flight."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    unknown_tokens: int = 0  # charged at worst case because the outcome was unknown
    usd: float = 0.0
    requests: int = 0
    reserved_tokens: int = 0
    reserved_usd: float = 0.0

    @property
    def tokens(self) -> int:
        """Total tokens spent (input + output + charged unknown)."""
        return self.input_tokens + self.output_tokens + self.unknown_tokens


@attrs.define(slots=True)
class Reservation:
    """A worst case held against the budget until it is settled, released or charged (exactly once).

    `input_tokens` / `output_tokens` split `tokens` when the caller knows the split (None: it does not);
    `input_ceiling` is the most input tokens the request can possibly use (None: no ceiling known).
    """

    tokens: int
    pico: int
    open: bool = True
    input_tokens: int | None = None
    output_tokens: int | None = None
    input_ceiling: int | None = None

    def as_usage(self) -> Usage:
        """The reservation as the usage it stands for (what an unknown outcome is charged)."""
        output = self.output_tokens if self.output_tokens is not None else self.tokens
        return Usage(self.tokens - output, output)


def usd_to_pico(usd: float) -> int:
    """USD -> integer picodollars, rounded down (a limit never grows by rounding)."""
    return int((Decimal(str(usd)) * _PICO_PER_USD).to_integral_value(ROUND_FLOOR))


class BudgetLedger:
    """Reservations and spend against an optional `Budget` (single event loop; no locks needed)."""

    def __init__(self, budget: Budget | None = None) -> None:
        self.budget = budget
        self._limit_tokens = budget.tokens if budget is not None else None
        self._limit_pico = usd_to_pico(budget.usd) if budget is not None and budget.usd is not None else None
        self._spent_tokens = 0
        self._spent_pico = 0
        self._reserved_tokens = 0
        self._reserved_pico = 0
        self._input = 0
        self._output = 0
        self._cached = 0
        self._unknown = 0
        self._requests = 0
        self._waiters = 0
        self._changed: anyio.Event | None = None

    @property
    def limited(self) -> bool:
        """Whether there is any limit to enforce."""
        return self._limit_tokens is not None or self._limit_pico is not None

    @property
    def reserved_tokens(self) -> int:
        """Tokens held by requests in flight."""
        return self._reserved_tokens

    @property
    def spent_pico(self) -> int:
        """Settled spend in picodollars."""
        return self._spent_pico

    def spend(self) -> Spend:
        """A snapshot of spend and reservations."""
        return Spend(
            input_tokens=self._input,
            output_tokens=self._output,
            cached_tokens=self._cached,
            unknown_tokens=self._unknown,
            usd=self._spent_pico / _PICO_PER_USD,
            requests=self._requests,
            reserved_tokens=self._reserved_tokens,
            reserved_usd=self._reserved_pico / _PICO_PER_USD,
        )

    def _never_fits(self, tokens: int, pico: int) -> bool:
        return (self._limit_tokens is not None and self._spent_tokens + tokens > self._limit_tokens) or (
            self._limit_pico is not None and self._spent_pico + pico > self._limit_pico
        )

    def _fits_now(self, tokens: int, pico: int) -> bool:
        lt, lp = self._limit_tokens, self._limit_pico
        return (lt is None or self._spent_tokens + self._reserved_tokens + tokens <= lt) and (
            lp is None or self._spent_pico + self._reserved_pico + pico <= lp
        )

    def _exceeded(self, tokens: int, pico: int) -> BudgetExceeded:
        spent = self.spend()
        parts = []
        if self._limit_tokens is not None:
            parts.append(f"{spent.tokens} of {self._limit_tokens} tokens spent, next needs up to {tokens}")
        if self._limit_pico is not None:
            parts.append(
                f"${spent.usd:.6f} of ${self._limit_pico / _PICO_PER_USD:.6f} spent, "
                f"next needs up to ${pico / _PICO_PER_USD:.6f}"
            )
        return BudgetExceeded("budget exhausted: " + "; ".join(parts), spent=spent)

    def try_reserve(
        self,
        tokens: int,
        pico: int,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        input_ceiling: int | None = None,
    ) -> Reservation | None:
        """Reserve now if it fits; None if it must wait for requests in flight; BudgetExceeded if never.

        The keywords may give `input_tokens` and `output_tokens` (the worst case's parts, when known; input
        None when the prompt was not counted) and `input_ceiling` (the most input the request can use,
        see module doc): `settle` checks the answer's usage against them.
        """
        if self._never_fits(tokens, pico):
            raise self._exceeded(tokens, pico)
        if not self._fits_now(tokens, pico):
            return None
        self._reserved_tokens += tokens
        self._reserved_pico += pico
        return Reservation(tokens, pico, True, input_tokens, output_tokens, input_ceiling)

    async def reserve(
        self,
        tokens: int,
        pico: int,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        input_ceiling: int | None = None,
    ) -> Reservation:
        """Reserve a worst case, waiting while requests in flight hold the room it needs."""
        split = {"input_tokens": input_tokens, "output_tokens": output_tokens, "input_ceiling": input_ceiling}
        res = self.try_reserve(tokens, pico, **split)
        while res is None:
            # Something is reserved (else it would fit), so a settle will come and wake us.
            if self._changed is None:
                self._changed = anyio.Event()
            event = self._changed
            self._waiters += 1
            try:
                await event.wait()
            finally:
                self._waiters -= 1
            res = self.try_reserve(tokens, pico, **split)
        return res

    def _close(self, res: Reservation) -> bool:
        if not res.open:
            return False
        res.open = False
        self._reserved_tokens -= res.tokens
        self._reserved_pico -= res.pico
        return True

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def release(self, res: Reservation) -> None:
        """Nothing was spent (never sent, or the API refused before doing work): free the room."""
        if self._close(res):
            self._notify()

    def charge_reserved(self, res: Reservation) -> None:
        """The outcome is unknown: spend the whole reservation."""
        if self._close(res):
            self._spent_tokens += res.tokens
            self._spent_pico += res.pico
            self._unknown += res.tokens
            self._requests += 1
            self._notify()

    def settle(self, res: Reservation, usage: Usage | None, pico: int) -> bool:
        """Spend what an answer reports (`pico`: its cost); False when it passed the reservation.

        No usage (None) is an unknown outcome: the reservation is spent (`res.as_usage()`, `res.pico`).
        An impossible usage (see module doc) spends the reservation and raises `BadResponse`.
        """
        if usage is None:
            self.charge_reserved(res)
            return True
        problem = impossible_usage(usage, res)
        if problem is not None:
            self.charge_reserved(res)
            raise BadResponse(f"the answer reports an impossible usage ({problem}); charged its reservation")
        if not self._close(res):
            return True
        tokens = usage.input_tokens + usage.output_tokens
        self._spent_tokens += tokens
        self._spent_pico += pico
        self._input += usage.input_tokens
        self._output += usage.output_tokens
        self._cached += usage.cached_tokens
        self._requests += 1
        self._notify()
        within = res.input_tokens is None or usage.input_tokens <= res.input_tokens
        return within and (not self.limited or (tokens <= res.tokens and pico <= res.pico))


def impossible_usage(usage: Usage, res: Reservation) -> str | None:
    """Why `usage` cannot be true for a request reserved as `res`, or None when it can."""
    i, o, c = usage.input_tokens, usage.output_tokens, usage.cached_tokens
    # Straight-line checks: this runs on every answer, so no generators (bool, float, str: never a count).
    if not (type(i) is int and type(o) is int and type(c) is int and i >= 0 and o >= 0 and c >= 0):
        return f"counts must be non-negative integers: {usage!r:.200}"
    if i > MAX_REPORTED_TOKENS or o > MAX_REPORTED_TOKENS or c > MAX_REPORTED_TOKENS:
        return f"more than {MAX_REPORTED_TOKENS} tokens in one request"
    if res.output_tokens is not None and usage.output_tokens > res.output_tokens:
        return f"{usage.output_tokens} output tokens, but at most {res.output_tokens} were asked for"
    if res.input_ceiling is not None and usage.input_tokens > res.input_ceiling:
        return f"{usage.input_tokens} input tokens, but the prompt can hold at most {res.input_ceiling}"
    return None


@attrs.frozen
class ModelPrice:
    """A model's price in picodollars per token, bound once (None = unpriced: costs count as 0)."""

    model: str
    input: int
    output: int
    cached: int
    priced: bool

    @classmethod
    def of(cls, model: str, price: Price | None) -> ModelPrice:
        """Bind `price` (or no price) to `model`."""
        if price is None:
            return cls(model, 0, 0, 0, False)
        i, o, c = price.pico_per_token()
        return cls(model, i, o, min(c, i), True)  # a cached token never costs more than an uncached one

    def worst(self, input_tokens: int, output_tokens: int) -> int:
        """Picodollars of a request at its worst case (all input uncached, full output)."""
        return input_tokens * self.input + output_tokens * self.output

    def cost(self, usage: Usage) -> int:
        """Picodollars of an actual usage."""
        cached = min(usage.cached_tokens, usage.input_tokens)
        uncached = usage.input_tokens - cached
        return uncached * self.input + cached * self.cached + usage.output_tokens * self.output


def bind_prices(models: Iterable[str], table: PriceTable, *, required: bool) -> dict[str, ModelPrice]:
    """Look up every model's price up front; with `required` (a USD budget) a missing one is an error."""
    out: dict[str, ModelPrice] = {}
    for model in models:
        if not isinstance(model, str) or not model:
            raise ConfigError(f"models must be non-empty model names, got {model!r}")
        out[model] = ModelPrice.of(model, table.require(model) if required else table.get(model))
    return out
