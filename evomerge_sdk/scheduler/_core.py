"""The query scheduler: every call to a model API goes through `Scheduler.call` (or `complete`).

Order of work for one call (each step is skipped when it is not configured):

1. cache: a hit (memory, then the SQLite file) returns at once and costs nothing;
2. de-duplication: an identical call already in flight is awaited instead of sent again;
3. budget: the worst case is reserved (waiting while calls in flight hold the room; `BudgetExceeded`
   when even a settled budget cannot cover it);
4. concurrency slot, then the RPM/TPM limiter (in that order, so queued calls cannot burst when a slot
   frees);
5. the attempt, under the per-request timeout; the reservation is then settled to the actual usage;
6. on a retryable error: settle the reservation (release it when the API refused before doing work,
   charge it in full when the outcome is unknown), back off outside the slot, and go to 3.

Cancellation at any point releases (or, once sent, charges) the reservation and frees the slot; the
scheduler starts no background task, so a cancelled caller leaves nothing behind.

A USD budget needs every model's price before the run starts: pass `models=[...]` to the constructor;
each is priced there (ConfigError for a model with no price), and calls for other models are refused
at once. Without a USD budget, `models` is optional (when given, it still restricts the calls).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from types import EllipsisType, TracebackType
from typing import Any

import anyio
import attrs

from .._checks import check_number, is_int
from .._logs import get_logger
from ..errors import (
    AuthenticationError,
    BadResponse,
    BudgetExceeded,
    ConfigError,
    InvalidRequest,
    RateLimited,
    RequestTimeout,
    ServerError,
    UsageError,
)
from ..providers import ATTEMPT_TIMEOUT, ChatRequest, Completion, Provider, RateLimitInfo, TokenLogprob, Usage
from ._budget import (
    Budget,
    BudgetLedger,
    ModelPrice,
    Price,
    PriceTable,
    Reservation,
    Spend,
    bind_prices,
    impossible_usage,
)
from ._cache import CachedValue, ResponseCache, chat_cache_key
from ._coordination import Coordination, Ledger, Limiter, ResultCache
from ._deadlines import Deadlines
from ._limiter import RateLimiter
from ._metrics import Metrics, MetricsSnapshot, redact
from ._retry import RetryPolicy
from ._slots import Slots
from ._tokens import TokenCounter

__all__ = ["CallResult", "Outcome", "Scheduler"]

# A call's worst case: its usage, whether the input part was counted, and the input ceiling (or None).
_Bound = tuple[Usage, bool, "int | None"]

_DEFAULT_LOG = get_logger("evomerge_sdk.scheduler")

# Errors after which the API did no billable work: the reservation is released, not charged. A
# ConfigError or UsageError is the SDK refusing the request (an unsendable body, a closed provider)
# before it is sent.
_NOT_SERVED = (RateLimited, ServerError, AuthenticationError, InvalidRequest, ConfigError, UsageError)


@attrs.frozen
class _Call:
    """What every attempt of one call shares: its worst case as the ledger reserves it (tokens, cost in
    picodollars, the input/output split), its model's limiter, its per-attempt timeout, and what its
    logs say."""

    tokens: int
    pico: int
    split: dict[str, int | None]
    limiter: Limiter
    model: str
    label: str
    key: str | None
    debug: dict[str, Any] | None
    started: float
    timeout: float | None


@attrs.define
class _Sent:
    """When an attempt's request left (None: it never did, so the API cannot have billed it)."""

    at: float | None = None


@attrs.frozen
class Outcome:
    """What a `call` function returns: a JSON-serialisable value, its usage, the API's rate-limit info.

    `usage=None` says the API did not report it: the call is charged its full reservation.
    """

    value: Any
    usage: Usage | None
    rate_limits: RateLimitInfo | None = None


@attrs.frozen
class CallResult:
    """A call's result. `cached` is true for cache and de-duplication hits (then `attempts` is 0)."""

    value: Any
    usage: Usage
    cached: bool
    attempts: int


CallFn = Callable[[], Awaitable["Outcome | tuple[Any, Usage]"]]


class _Flight:
    """One call in flight that identical calls wait for (the event exists only once someone waits)."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done: anyio.Event | None = None
        self.result: CallResult | None = None
        self.error: Exception | None = None


class Scheduler:
    """Concurrency, RPM/TPM limits, a hard token/USD budget, retries, a response cache and metrics.

    Use it as `async with Scheduler(...) as s:`; then `await s.complete(provider, request)` for chat
    calls, or `await s.call(fn, model=..., reserve=...)` for any other billable call.

    Arguments (all checked here, so a bad setting fails before the run):
    - `max_concurrency`: calls in flight at once.
    - `rpm`, `tpm`: requests and tokens per minute (None: none). The limiter also adopts lower limits the
      API reports; `limits_per_model=True` keeps one limiter per model (OpenAI limits are per model).
    - `budget`: `Budget(tokens=..., usd=...)`, a hard cap; `models`: the models this scheduler will
      serve, required with a USD budget so each is priced up front; `prices` overrides `DEFAULT_PRICES`.
    - `retry`: a `RetryPolicy`; `timeout`: seconds per attempt (None: no timeout).
    - `cache`: True (memory), False (none), a file path (memory + SQLite) or a `ResponseCache`.
    - `shared`: a `Coordination` such as `RedisCoordination(url, namespace=...)`: the limits, the budget
      and (with `cache=True`) the cache are then shared by every worker on it (see `RedisCoordination`).
    - `tokens`: the `TokenCounter` (encodings per model, offline estimate).
    - `log_prompts`: put prompts in the per-request debug events (off: events carry sizes only).
    """

    def __init__(
        self,
        *,
        max_concurrency: int = 64,
        rpm: float | None = None,
        tpm: float | None = None,
        limits_per_model: bool = False,
        budget: Budget | None = None,
        models: Iterable[str] | None = None,
        prices: Mapping[str, Price] | PriceTable | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = 60.0,
        cache: bool | str | os.PathLike[str] | ResponseCache = True,
        tokens: TokenCounter | None = None,
        log_prompts: bool = False,
        logger: Any = None,
        shared: Coordination | None = None,
    ) -> None:
        check_number("max_concurrency", max_concurrency, integer=True)
        check_number("timeout", timeout, allow_none=True, unit="seconds")
        if budget is not None and not isinstance(budget, Budget):
            raise ConfigError(f"budget must be a Budget(tokens=..., usd=...) or None, got {budget!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry must be a RetryPolicy, got {retry!r}")
        if shared is not None and not callable(getattr(shared, "ledger", None)):
            raise ConfigError(
                f"shared must be a Coordination such as RedisCoordination(...), got {shared!r:.80}"
            )
        self._shared = shared
        self._retry = retry or RetryPolicy()
        # No server pauses everyone longer than it could make one request wait (max_retry_after).
        self._limiter: Limiter = RateLimiter(
            rpm, tpm, max_pause=self._retry.max_retry_after
        )  # validates rpm/tpm
        self._limits = (self._limiter.rpm, self._limiter.tpm)
        if shared is not None:
            self._limiter = shared.limiter("*", *self._limits, max_pause=self._retry.max_retry_after)
        if not isinstance(limits_per_model, bool):
            raise ConfigError(f"limits_per_model must be True or False, got {limits_per_model!r}")
        self._per_model = limits_per_model
        self._limiters: dict[str, Limiter] = {}
        self._table = prices if isinstance(prices, PriceTable) else PriceTable(prices)
        need_usd = budget is not None and budget.usd is not None
        if models is not None and (isinstance(models, str) or not isinstance(models, Iterable)):
            raise ConfigError(f"models must be a list of model names, got {models!r:.80}")
        declared = list(models) if models is not None else None
        if need_usd and not declared:
            raise ConfigError(
                "a USD budget needs models=[...]: every model is priced when the scheduler is built, "
                "so a missing price fails now and not in the middle of a run"
            )
        self._declared = declared is not None
        self._prices: dict[str, ModelPrice] = bind_prices(declared or (), self._table, required=need_usd)
        self._ledger: Ledger = BudgetLedger(budget) if shared is None else shared.ledger(budget)
        self._rng = self._retry.rng()
        self._timeout = timeout
        self._slots = Slots(max_concurrency)
        self.max_concurrency = max_concurrency
        if cache is True:
            self._cache: ResultCache | None = ResponseCache() if shared is None else shared.cache()
        elif cache is False:
            self._cache = None
        elif isinstance(cache, ResponseCache):
            self._cache = cache
        elif isinstance(cache, (str, os.PathLike)):
            self._cache = ResponseCache(cache)
        else:
            raise ConfigError(f"cache must be True, False, a file path or a ResponseCache, got {cache!r}")
        if tokens is not None and not isinstance(tokens, TokenCounter):
            raise ConfigError(f"tokens must be a TokenCounter, got {tokens!r}")
        self._tokens = tokens or TokenCounter()
        self._log_prompts = bool(log_prompts)
        self._log = logger if logger is not None else _DEFAULT_LOG
        self._metrics = Metrics()
        self._inflight: dict[str, _Flight] = {}
        self._open = False
        self._deadlines: Deadlines | None = None
        self._debug = True

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Scheduler:
        if self._open:
            raise UsageError("this Scheduler is already open")
        if self._shared is not None:
            await self._shared.open()
        if self._cache is not None:
            try:
                await self._cache.open()
            except BaseException:
                # A cache file that cannot be opened: the coordination opened above is closed again
                # (its pumps and connection would otherwise outlive the failed `async with`).
                if self._shared is not None:
                    await self._shared.aclose()
                raise
        if _shared_deadlines() and self._timeout is not None:
            self._deadlines = Deadlines(self._timeout)
        self._debug = _debug_enabled(self._log)
        self._open = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._open = False
        if self._deadlines is not None:
            self._deadlines.close()
            self._deadlines = None
        if self._cache is not None:
            await self._cache.aclose()
        if self._shared is not None:
            await self._shared.aclose()
        m = self._metrics
        self._log.info("scheduler_closed", requests=m.requests, cache_hits=m.cache_hits, failed=m.failed)

    # -- public state ------------------------------------------------------------------------------

    @property
    def cache(self) -> ResultCache | None:
        """The response cache, or None when caching is off."""
        return self._cache

    @property
    def budget(self) -> Budget | None:
        """The hard budget (None: no cap)."""
        return self._ledger.budget

    @property
    def tokens(self) -> TokenCounter:
        """The token counter used for reservations."""
        return self._tokens

    def spent(self) -> Spend:
        """Spend so far (settled, plus what calls in flight have reserved)."""
        return self._ledger.spend()

    def metrics(self) -> MetricsSnapshot:
        """Counters and latency percentiles so far."""
        return self._metrics.snapshot()

    def limiter(self, model: str | None = None) -> Limiter:
        """The rate limiter that governs `model` (the shared one unless `limits_per_model`)."""
        if not self._per_model or model is None:
            return self._limiter
        lim = self._limiters.get(model)
        if lim is None:
            shared = self._shared
            lim = self._limiters[model] = (
                RateLimiter(*self._limits, max_pause=self._retry.max_retry_after)
                if shared is None
                else shared.limiter(model, *self._limits, max_pause=self._retry.max_retry_after)
            )
        return lim

    def set_rate_limits(self, *, rpm: float | None, tpm: float | None) -> None:
        """Change the RPM/TPM ceilings at run time (every limiter of this scheduler)."""
        self._limiter.set_limits(rpm=rpm, tpm=tpm)
        self._limits = (self._limiter.rpm, self._limiter.tpm)
        for lim in self._limiters.values():
            lim.set_limits(rpm=rpm, tpm=tpm)

    async def flush(self) -> None:
        """Wait until every cached result so far is on disk (call it when writing a checkpoint)."""
        if self._cache is not None:
            await self._cache.flush()

    def check_affordable(self, plan: Mapping[str, Usage], what: str) -> None:
        """Money before queries: `BudgetExceeded` saying how much is needed, before anything is sent, when
        the worst case of `plan` (usage per model, e.g. a scoring pass or one search generation) does not
        fit in what the budget has left. Requests answered from the cache belong outside `plan`."""
        budget = self._ledger.budget
        if budget is None:
            return
        spent = self._ledger.spend()
        short = []
        tokens = sum(u.input_tokens + u.output_tokens for u in plan.values())
        used = spent.tokens + spent.reserved_tokens
        if budget.tokens is not None and used + tokens > budget.tokens:
            short.append(
                f"up to {tokens:,} tokens but {max(0, budget.tokens - used):,} of the "
                f"{budget.tokens:,}-token budget are left (a budget of at least {used + tokens:,} tokens "
                "pays for it)"
            )
        if budget.usd is not None:
            usd = sum(self.price(m).cost(u) for m, u in plan.items()) / 1e12
            used_usd = spent.usd + spent.reserved_usd
            if used_usd + usd > budget.usd:
                short.append(
                    f"up to ${usd:.6f} but ${max(0.0, budget.usd - used_usd):.6f} of the ${budget.usd:g} "
                    f"budget is left (at least ${used_usd + usd:.6f} pays for it)"
                )
        if short:
            raise BudgetExceeded(f"{what} needs " + "; ".join(short) + ": nothing was sent", spent=spent)

    def price(self, model: str) -> ModelPrice:
        """The price bound to `model` (ConfigError for a model this scheduler was not built for)."""
        if not isinstance(model, str) or not model:
            raise ConfigError(f"model must be a non-empty string, got {model!r}")
        p = self._prices.get(model)
        if p is None:
            if self._declared:
                raise ConfigError(
                    f"model {model!r} is not among the models this scheduler was built for "
                    f"({sorted(self._prices)}); add it to models=[...]"
                )
            p = self._prices[model] = ModelPrice.of(model, self._table.get(model))
        return p

    # -- calls -------------------------------------------------------------------------------------

    async def complete(self, provider: Provider, request: ChatRequest, *, cache: bool = True) -> Completion:
        """Send a chat request through the scheduler; `cache=False` skips the cache and de-duplication.

        The cache key is the provider's name plus the request's canonical JSON, so a cached answer is
        reused for an identical request whatever its temperature: pass `cache=False` to sample anew.
        """
        if not callable(getattr(provider, "complete", None)):
            raise ConfigError(f"provider must be a Provider (with a complete method), got {provider!r:.60}")
        if not isinstance(request, ChatRequest):
            raise ConfigError(f"request must be a ChatRequest, got {type(request).__name__}")
        price = self.price(request.model)
        key = chat_cache_key(provider.name, request) if cache else None

        async def worst() -> _Bound:
            counted = await self._tokens.acount_request(request)
            return Usage(counted, request.max_tokens), True, self._tokens.ceiling(request)

        debug = {"prompt": [[m.role, m.content] for m in request.messages]} if self._log_prompts else None
        send = partial(provider.complete, request)  # no wrapper coroutine: one frame less per resume
        if self._ledger.limited or self.limiter(price.model).tpm is not None:
            result, live = await self._run(send, _chat_outcome, price, worst, key, "chat", debug)
        else:  # nothing is limited by tokens: no need to count the prompt
            bound = (Usage(0, request.max_tokens), False, None)
            result, live = await self._run(send, _chat_outcome, price, bound, key, "chat", debug)
        if isinstance(live, Completion):  # sent by this call: keep its rate-limit info
            return live if live.usage_known else attrs.evolve(live, usage=result.usage)
        return _completion_from_json(result.value, result.usage)

    async def call(
        self,
        fn: CallFn,
        *,
        model: str,
        reserve: Usage,
        cache_key: str | None = None,
        label: str = "call",
        attempt_timeout: float | EllipsisType | None = ...,
    ) -> CallResult:
        """Run one billable call `fn` under the budget, limits, retries, cache and metrics.

        `fn()` performs the call and returns an `Outcome` (or `(value, usage)`), raising the SDK's
        `ProviderError` types on failure (only `RetryableError`s are retried). `reserve` is its worst
        case (input tokens, maximum output tokens), which must bound the usage it reports for the
        budget to be hard. `value` must be JSON-serialisable when a cache file is used. With
        `cache_key` (see `evomerge_sdk.scheduler.cache_key`) the result is cached and identical calls
        in flight share one request. `attempt_timeout` replaces the scheduler's per-attempt timeout for
        this call (None: none, for a caller that bounds its own requests).
        """
        if not callable(fn):
            raise ConfigError(f"fn must be an async function returning an Outcome, got {fn!r:.80}")
        if attempt_timeout is not ...:
            check_number("attempt_timeout", attempt_timeout, allow_none=True, unit="seconds")
        price = self.price(model)
        tokens = (reserve.input_tokens, reserve.output_tokens) if isinstance(reserve, Usage) else (-1,)
        if not all(is_int(t) and t >= 0 for t in tokens):
            raise ConfigError(f"reserve must be a Usage with non-negative token counts, got {reserve!r}")
        bound = (reserve, True, reserve.input_tokens)  # the caller's worst case bounds what it may report
        return (await self._run(fn, _outcome, price, bound, cache_key, label, None, attempt_timeout))[0]

    async def _lookup(self, key: str, check: Callable[[Any], bool] | None) -> CachedValue | None:
        cache = self._cache
        if cache is None:
            return None
        hit = cache.get(key)
        if hit is None and cache.on_disk(key):
            hit = await cache.load(key, check)  # a damaged row is a miss (counted by the cache)
        return hit

    async def _run(
        self,
        fn: Callable[[], Awaitable[Any]],
        convert: Callable[[Any], Outcome],
        price: ModelPrice,
        worst: _Bound | Callable[[], Awaitable[_Bound]],
        key: str | None,
        label: str,
        debug: dict[str, Any] | None,
        attempt_timeout: float | EllipsisType | None = ...,
    ) -> tuple[CallResult, Any]:
        """The call's result, and what `fn` returned when this call sent it (None for a hit)."""
        if not self._open:
            raise UsageError("open the scheduler first: `async with Scheduler(...) as scheduler:`")
        m = self._metrics
        m.calls += 1
        if key is None:
            return await self._execute(fn, convert, price, worst, label, debug, None, attempt_timeout)
        check = _is_completion_json if convert is _chat_outcome else None
        while True:
            hit = await self._lookup(key, check)
            if hit is not None:
                m.cache_hits += 1
                return CallResult(hit.value, hit.usage, cached=True, attempts=0), None
            flight = self._inflight.get(key)
            if flight is None:
                break
            if flight.done is None:
                flight.done = anyio.Event()
            await flight.done.wait()
            if flight.result is not None:
                m.dedup_hits += 1
                r = flight.result
                return CallResult(r.value, r.usage, cached=True, attempts=0), None
            if flight.error is not None:
                raise flight.error
            # The call we waited for was cancelled: look again, and maybe send it ourselves.
        flight = self._inflight[key] = _Flight()
        try:
            result, raw = await self._execute(fn, convert, price, worst, label, debug, key, attempt_timeout)
            if self._cache is not None:
                self._cache.put(key, result.value, result.usage)
            flight.result = result
            return result, raw
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._inflight[key]
            if self._cache is not None:
                self._cache.abandon(key)  # after a failure, another worker may compute it
            if flight.done is not None:
                flight.done.set()

    async def _execute(
        self,
        fn: Callable[[], Awaitable[Any]],
        convert: Callable[[Any], Outcome],
        price: ModelPrice,
        worst: _Bound | Callable[[], Awaitable[_Bound]],
        label: str,
        debug: dict[str, Any] | None,
        key: str | None,
        attempt_timeout: float | EllipsisType | None = ...,
    ) -> tuple[CallResult, Any]:
        """Reserve, attempt, settle; again after a retryable failure. The call's result and `fn`'s value."""
        started = time.perf_counter()
        bound = worst if isinstance(worst, tuple) else await worst()
        worst_usage, input_counted, ceiling = bound
        call = _Call(
            tokens=worst_usage.input_tokens + worst_usage.output_tokens,
            pico=price.worst(worst_usage.input_tokens, worst_usage.output_tokens),
            split={
                "input_tokens": worst_usage.input_tokens if input_counted else None,
                "output_tokens": worst_usage.output_tokens,
                "input_ceiling": ceiling,
            },
            limiter=self.limiter(price.model),
            model=price.model,
            label=label,
            key=key,
            debug=debug,
            started=started,
            timeout=self._timeout if attempt_timeout is ... else attempt_timeout,
        )
        attempt = 0
        while True:
            attempt += 1
            # No await (one coroutine frame less on every resume) unless the budget must wait for room.
            res = self._reserve_now(call) or await self._reserve(call)
            sent = _Sent()
            try:
                raw, out = await self._attempt(fn, convert, call, sent)
                usage, cost, within = self._settle(res, out, price)
            except BaseException as exc:
                await anyio.sleep(self._after_failure(exc, res, sent.at is not None, attempt, call))
                continue
            assert sent.at is not None
            self._record(call, out, usage, cost, within, sent.at, attempt)
            return CallResult(out.value, usage, cached=False, attempts=attempt), raw

    def _reserve_now(self, call: _Call) -> Reservation | None:
        """Hold the call's worst case under the budget if it fits now; None when reservations in flight
        hold the room it needs; BudgetExceeded (logged, counted) when it cannot fit even then."""
        try:
            return self._ledger.try_reserve(call.tokens, call.pico, **call.split)
        except BudgetExceeded as exc:
            self._reject(exc, call.model, call.label)
            raise

    async def _reserve(self, call: _Call) -> Reservation:
        """`_reserve_now`, waiting while reservations in flight may free room."""
        try:
            return await self._ledger.reserve(call.tokens, call.pico, **call.split)
        except BudgetExceeded as exc:
            self._reject(exc, call.model, call.label)
            raise

    async def _attempt(
        self,
        fn: Callable[[], Awaitable[Any]],
        convert: Callable[[Any], Outcome],
        call: _Call,
        sent: _Sent,
    ) -> tuple[Any, Outcome]:
        """Send the call once: a concurrency slot, the rate limiter, then `fn` under the attempt timeout.
        `sent.at` is set once the request leaves, so a failure knows whether the API may have billed it."""
        m = self._metrics
        slots = self._slots
        if not slots.try_acquire():
            await slots.acquire()
        try:
            if call.limiter.active:  # a start further away than the timeout fails now, as Timeout
                await call.limiter.acquire(call.tokens, max_wait=call.timeout)
            m.requests += 1
            m.in_flight += 1
            sent.at = time.perf_counter()
            try:
                # `fn()` within the per-attempt timeout (the provider is told it through ATTEMPT_TIMEOUT),
                # inline rather than in a helper coroutine: every frame is paid again on every resume.
                timeout, deadlines = call.timeout, self._deadlines
                if timeout is None:
                    raw = await fn()
                else:
                    token = ATTEMPT_TIMEOUT.set(timeout)
                    try:
                        # asyncio: one shared timer (see _deadlines) for the scheduler's own timeout
                        if deadlines is not None and timeout == deadlines.timeout:
                            deadline = deadlines.start()
                            try:
                                raw = await fn()
                            except asyncio.CancelledError as exc:
                                if deadlines.expired(deadline):
                                    raise TimeoutError from exc
                                raise
                            finally:
                                deadline.finish()
                            if deadline.expired:  # it fired as fn returned: take back its pending cancel
                                try:
                                    await asyncio.sleep(0)
                                except asyncio.CancelledError:
                                    if not deadlines.expired(deadline):
                                        raise
                        else:
                            with anyio.fail_after(timeout):
                                raw = await fn()
                    finally:
                        ATTEMPT_TIMEOUT.reset(token)
                return raw, convert(raw)  # a malformed return is an error of a sent request
            finally:
                m.in_flight -= 1
        finally:
            slots.release()

    def _settle(self, res: Reservation, out: Outcome, price: ModelPrice) -> tuple[Usage, int, bool]:
        """Spend what the answer used, and whether it stayed within its reservation. The ledger's rules: no
        usage is an unknown outcome (the reservation is spent); an impossible one spends the reservation
        and raises BadResponse (retried, never cached)."""
        if out.usage is None:
            usage, cost = res.as_usage(), res.pico
        else:
            usage = out.usage
            # Not priced when impossible: a count that is text or None would make pricing raise a
            # TypeError before the ledger could refuse it as the BadResponse it is.
            cost = res.pico if impossible_usage(usage, res) is not None else price.cost(usage)
        return usage, cost, self._ledger.settle(res, out.usage, cost)

    def _after_failure(
        self,
        exc: BaseException,
        res: Reservation,
        sent: bool,
        attempt: int,
        call: _Call,
    ) -> float:
        """Settle a failed attempt's reservation and learn from its error (rate limits, pauses); the delay
        before the next attempt, or the error raised when it is final."""
        m, ledger = self._metrics, self._ledger
        if isinstance(exc, BadResponse) and not res.open:
            m.reservation_overruns += 1
        if not sent or isinstance(exc, _NOT_SERVED):
            ledger.release(res)
        else:
            ledger.charge_reserved(res)
        if not isinstance(exc, Exception):
            raise exc  # cancellation and friends: the reservation is settled, nothing else to do
        err: Exception = exc
        if isinstance(exc, TimeoutError):
            err = RequestTimeout(f"no answer within {call.timeout} s", status=None)
        delay = self._retry.delay(err, attempt, self._rng)
        info = getattr(err, "rate_limits", None)  # any provider error may carry the API's limits
        if isinstance(info, RateLimitInfo):
            call.limiter.observe(info)
        if isinstance(err, RateLimited):
            m.rate_limited += 1
            call.limiter.pause(err.retry_after if err.retry_after is not None else (delay or 0.0))
        if delay is None:
            m.failed += 1
            self._log.warning(
                "request_failed", model=call.model, label=call.label, attempt=attempt, **_describe(err)
            )
            if err is exc:
                raise exc
            raise err from exc
        m.retries += 1
        self._log.info(
            "request_retry",
            model=call.model,
            label=call.label,
            attempt=attempt,
            delay_s=round(delay, 4),
            **_describe(err),
        )
        return delay

    def _record(
        self, call: _Call, out: Outcome, usage: Usage, cost: int, within: bool, sent_at: float, attempt: int
    ) -> None:
        """A success in the metrics, the limiter (the API's reported limits) and the log."""
        m = self._metrics
        if not within:
            m.reservation_overruns += 1
            self._log.warning(
                "reservation_overrun",
                model=call.model,
                label=call.label,
                reserved_tokens=call.tokens,
                used_tokens=usage.total_tokens,
            )
        now = time.perf_counter()
        m.succeeded += 1
        if out.usage is not None:  # an unknown usage is in spent().unknown_tokens only
            m.tokens_in += usage.input_tokens
            m.tokens_out += usage.output_tokens
            m.cached_tokens += usage.cached_tokens
            m.cost_pico += cost
        m.latencies.append(now - sent_at)
        m.total_latencies.append(now - call.started)
        if out.rate_limits is not None:
            call.limiter.observe(out.rate_limits)
        if self._debug:
            self._log.debug(
                "request",
                model=call.model,
                label=call.label,
                key=call.key[:12] if call.key else None,
                attempt=attempt,
                latency_ms=round((now - sent_at) * 1e3, 3),
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost_usd=cost / 10**12,
                **(call.debug or {}),
            )

    def _reject(self, exc: BudgetExceeded, model: str, label: str) -> None:
        m = self._metrics
        m.budget_rejections += 1
        m.failed += 1
        spent = exc.spent
        self._log.info(
            "budget_exceeded",
            model=model,
            label=label,
            spent_tokens=getattr(spent, "tokens", None),
            spent_usd=getattr(spent, "usd", None),
        )


def _shared_deadlines() -> bool:
    """Whether attempts can share one timer (`Deadlines`): asyncio with Python >= 3.11 (Task.uncancel).
    Elsewhere (trio, or 3.10) each attempt gets an anyio scope."""
    if sys.version_info >= (3, 11):
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # another backend (trio)
            return False
        return True
    return False


def _debug_enabled(log: Any) -> bool:
    """Whether per-request debug events would be emitted (decided when the scheduler opens): the SDK's
    own logger asks `logging` (or the application's structlog configuration), see `_logs`."""
    if log is _DEFAULT_LOG:
        return bool(_DEFAULT_LOG.is_enabled_for(logging.DEBUG))
    try:
        bound = log.bind()
        check = getattr(bound, "is_enabled_for", None) or getattr(bound, "isEnabledFor", None)
        return True if check is None else bool(check(logging.DEBUG))
    except Exception:  # an unusual logger: emit, and let it filter
        return True


def _describe(exc: BaseException) -> dict[str, Any]:
    """Loggable facts about an error: its type, status and a redacted, truncated message."""
    return {"error": type(exc).__name__, "status": getattr(exc, "status", None), "message": redact(str(exc))}


def _outcome(raw: Any) -> Outcome:
    if isinstance(raw, Outcome):
        out = raw
    elif isinstance(raw, tuple) and len(raw) in (2, 3):
        out = Outcome(*raw)
    else:
        raise ConfigError(
            f"a call function must return an Outcome or (value, Usage), got {type(raw).__name__}"
        )
    if not (out.usage is None or isinstance(out.usage, Usage)) or not (
        out.rate_limits is None or isinstance(out.rate_limits, RateLimitInfo)
    ):
        raise ConfigError(
            f"a call function returned a bad usage or rate_limits: {out.usage!r}, {out.rate_limits!r}"
        )
    return out


def _chat_outcome(raw: Any) -> Outcome:
    if not isinstance(raw, Completion):
        raise BadResponse(f"a provider's complete() returned {type(raw).__name__}, not a Completion")
    if not isinstance(raw.usage, Usage):
        raise BadResponse(f"the provider reported a usage that is not a Usage: {raw.usage!r:.200}")
    return Outcome(_completion_to_json(raw), raw.usage if raw.usage_known else None, raw.rate_limits)


def _completion_to_json(c: Completion) -> dict[str, Any]:
    logprobs = None
    if c.logprobs is not None:
        logprobs = [[t.token, t.logprob, [list(alt) for alt in t.top]] for t in c.logprobs]
    return {"text": c.text, "model": c.model, "finish_reason": c.finish_reason, "logprobs": logprobs}


def _is_completion_json(value: Any) -> bool:
    """Whether a cached value has the shape `_completion_to_json` writes (a damaged row may not)."""
    if not isinstance(value, dict):
        return False
    text, model, finish, logprobs = (value.get(k) for k in ("text", "model", "finish_reason", "logprobs"))
    if not (isinstance(text, str) and isinstance(model, str) and (finish is None or isinstance(finish, str))):
        return False
    if logprobs is None:
        return True

    def pair(item: Any) -> bool:
        return (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], (int, float))
        )

    return isinstance(logprobs, list) and all(
        isinstance(e, list)
        and len(e) == 3
        and pair(e[:2])
        and isinstance(e[2], list)
        and all(pair(alt) for alt in e[2])
        for e in logprobs
    )


def _completion_from_json(value: dict[str, Any], usage: Usage) -> Completion:
    logprobs = None
    if value.get("logprobs") is not None:
        logprobs = tuple(
            TokenLogprob(tok, lp, tuple((alt[0], alt[1]) for alt in top))
            for tok, lp, top in value["logprobs"]
        )
    return Completion(
        text=value["text"],
        model=value["model"],
        finish_reason=value.get("finish_reason"),
        logprobs=logprobs,
        usage=usage,
    )
