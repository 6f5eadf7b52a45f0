"""Many workers, one API key: the scheduler's limiter, budget and cache shared through Redis.

    coordination = RedisCoordination("redis://127.0.0.1:6379/0", namespace="team-a")
    async with Scheduler(shared=coordination, rpm=500, budget=Budget(tokens=2_000_000)) as scheduler:
        ...

Every worker (process, machine, replica) that opens a scheduler on the same Redis and namespace shares:

- one GCRA RPM/TPM limiter per scope (all models, or one per model with `limits_per_model`): each
  acquisition is one atomic Lua script that books the next start slot on the server's clock, so the
  workers together keep the configured rate with zero burst. One worker's rate-limit headers lower the
  limit for all of them (never below `rate_floor` x the configured limit nor `RateLimiter.MIN_RPM` /
  `MIN_TPM`, for `rate_ttl` seconds, renewed while the headers keep saying so); a 429's Retry-After
  pauses all of them (at most the scheduler's `RetryPolicy.max_retry_after`); a start further away
  than the request's timeout is not booked and fails at once with `RequestTimeout`, as in one process.
- one hard token/USD budget: reserve, settle, release and charge are atomic scripts against shared
  totals. Each reservation holds a lease that its worker renews every `lease / 3` seconds while the
  request is in flight; a lease that runs out (the worker died or stalled) is charged in full by the next
  script that looks, so the budget stays hard whatever happens to a worker. The first worker that
  declares a budget stores it for the namespace; a worker that declares a different one is refused at
  open, and one that declares none is held to the stored one.
- one response cache: values live `cache_ttl` seconds; at most `cache_max_entries` are kept, the oldest
  inserted evicted first (exact: a sorted index, trimmed by the same script that stores), values over
  `max_value_bytes` stay in the worker's memory only. A miss claims the key (a lease renewed like a
  reservation's), so across processes one computes and the others wait for its answer, at most
  `dedup_wait` seconds (then they compute it themselves).

Round trips: a request costs three awaited scripts (cache lookup, reserve, acquire); settling, storing
and lease renewals are queued and sent in pipelines without holding up the caller. Every script sent
while one pipeline is on the wire goes out in the next one, so concurrency batches them for free.

Failure: Redis unreachable at open is a `ConfigError` naming the (password-masked) URL. Lost mid-run (a
connection error, a timeout, or a Redis that restarted or was flushed, which the namespace's epoch key
detects) is a `CoordinationLost` for every call from then on: no request is sent without a reservation
on the shared budget, and a search stops with its resumable checkpoint. Requests already in flight
finish; their reservations are charged in full when their leases run out, if Redis kept them.

Keys are `evomerge:{<namespace>}:...`, built from the namespace, model names and cache digests only:
never an API key. Needs the `redis` extra (`pip install 'evomerge-sdk[redis]'`) and asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import attrs

from .._checks import check_number, is_int
from .._logs import get_logger, register_secret
from ..errors import BadResponse, BudgetExceeded, ConfigError, CoordinationLost, RequestTimeout, UsageError
from ..providers import RateLimitInfo, Usage
from . import _lua
from ._budget import _PICO_PER_USD, Budget, Reservation, Spend, impossible_usage, usd_to_pico
from ._cache import CachedValue
from ._limiter import RateLimiter, check_rate

__all__ = ["RedisCoordination"]

_log = get_logger("evomerge_sdk.shared")
_REDIS_HINT = "pip install 'evomerge-sdk[redis]'"
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PICO_PER_NANO = 1000
_MAX_NANO = 2**53  # Lua numbers are doubles: integers are exact below this
_BATCH = 512
# Pipelines on the wire at once: a caller's script need not wait behind another's batch (scripts whose
# order matters are made order-proof: a settle or release that overtakes its reservation finds nothing,
# and a cancelled reservation is released only after its script has answered).
_PUMPS = 4


def mask_url(url: str) -> str:
    """The URL with its password replaced, so it can appear in errors and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparseable redis url>"


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


@attrs.define(slots=True, eq=False)
class _Op:
    name: str
    keys: Sequence[str]
    args: Sequence[str | int | float | bytes]
    fut: asyncio.Future[list[Any]]
    reloads: int = 0


class _Link:
    """One Redis connection pool, the scripts, and a pump that sends queued scripts in pipelines."""

    def __init__(self, url: str, namespace: str, timeout: float) -> None:
        self.url = url
        self.shown = mask_url(url)
        self.prefix = f"evomerge:{{{namespace}}}:"
        self.epoch_key = self.prefix + "epoch"
        self.epoch = ""
        self.owner = secrets.token_hex(8)  # this process, in cache claims and reservation ids
        self.timeout = timeout
        self.lost: CoordinationLost | None = None
        self.on_lost: list[Callable[[], None]] = []
        self._client: Any = None
        self._sha: dict[str, str] = {}
        self._queue: list[_Op] = []
        self._sending: set[_Op] = set()
        self._wake: asyncio.Event | None = None
        self._pumps: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        """Connect, load the scripts, and learn (or create) the namespace's epoch."""
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError as exc:  # pragma: no cover - the extra is part of the dev install
            raise ConfigError(f"RedisCoordination needs redis-py: {_REDIS_HINT}") from exc
        try:
            asyncio.get_running_loop()
        except RuntimeError as exc:
            raise ConfigError("RedisCoordination runs on asyncio (redis-py's asyncio client)") from exc
        try:
            # No retries inside redis-py: a pipeline re-sent after a broken connection could reserve
            # twice. A lost connection is a lost coordinator.
            client = aioredis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL {self.shown!r}: {exc}") from None
        try:
            await client.ping()
            for name, source in _lua.SCRIPTS.items():
                self._sha[name] = await client.script_load(source)
            await client.set(self.epoch_key, secrets.token_hex(16), nx=True)
            epoch = await client.get(self.epoch_key)
        except Exception as exc:
            await client.aclose()
            raise ConfigError(f"cannot use Redis at {self.shown}: {type(exc).__name__}: {exc}") from None
        self.epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        self.lost = None
        self._client = client
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._pumps = [
            loop.create_task(self._run_pump(), name=f"evomerge-redis-pump-{i}") for i in range(_PUMPS)
        ]

    async def disconnect(self) -> None:
        """Send what is queued (a few seconds at most), then close the connections."""
        if self._client is None:
            return
        if self.lost is None:
            with contextlib.suppress(asyncio.TimeoutError, CoordinationLost):
                await asyncio.wait_for(self.drain(), timeout=max(1.0, 2 * self.timeout))
        pumps, self._pumps = self._pumps, []
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        self._fail_pending(self.lost or CoordinationLost(f"the coordination on {self.shown} was closed"))
        client, self._client = self._client, None
        self._wake = None  # closed: `submit` refuses, `post` drops
        await client.aclose()

    def key(self, *parts: str) -> str:
        """A key of this namespace."""
        return self.prefix + ":".join(parts)

    def submit(self, name: str, keys: Sequence[str], args: Sequence[str | int | float | bytes]) -> Any:
        """Queue script `name`; the returned future gets its reply (epoch checked) or CoordinationLost."""
        if self.lost is not None:
            raise self.lost
        if self._wake is None:
            raise UsageError("open the scheduler (or the RedisCoordination) first")
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Op(name, (self.epoch_key, *keys), (self.epoch, *args), fut))
        self._wake.set()
        return fut

    async def call(self, name: str, keys: Sequence[str], args: Sequence[str | int | float | bytes]) -> Any:
        """Run script `name` and return its reply."""
        return await self.submit(name, keys, args)

    def post(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[str | int | float | bytes],
        then: Callable[[list[Any]], None] | None = None,
    ) -> None:
        """Queue script `name` without waiting for it (a failure marks the link lost, nothing else).
        Dropped when the link is lost or closed: a settlement that cannot reach Redis is covered by its
        reservation's lease, which charges it in full."""
        if self.lost is not None or self._wake is None:
            return
        fut = self.submit(name, keys, args)

        def done(f: asyncio.Future[list[Any]]) -> None:
            if not f.cancelled() and f.exception() is None and then is not None:
                then(f.result())

        fut.add_done_callback(done)

    async def drain(self) -> None:
        """Wait until every script queued so far has been applied."""
        pending = [op.fut for op in (*self._sending, *self._queue)]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self.lost is not None:
            raise self.lost

    async def _run_pump(self) -> None:
        assert self._wake is not None
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._queue = self._queue[:_BATCH], self._queue[_BATCH:]
            # The batch stays in `_sending` until every reply is handed out, so a loss found at any
            # point fails the rest of it too: no caller may wait for a reply that will never come.
            self._sending.update(batch)
            resend: list[_Op] = []
            try:
                outcome = self._send(batch, await self._execute(batch))
                if outcome is None:
                    return
                resend = outcome
                if resend and not await self._reload():
                    return
            finally:
                self._sending.difference_update(batch)
                for op in batch:  # only when the pump itself was cancelled (the link is closing)
                    if op not in resend and not op.fut.done():
                        op.fut.set_exception(self.lost or CoordinationLost(f"{self.shown}: closed"))
                        op.fut.exception()
            self._queue[:0] = resend  # they never ran: send them again, first

    async def _reload(self) -> bool:
        """Load the scripts again (someone ran SCRIPT FLUSH; a restart is caught by the epoch)."""
        try:
            for name, source in _lua.SCRIPTS.items():
                self._sha[name] = await self._client.script_load(source)
        except Exception as exc:
            self.lose(f"cannot load the scripts again: {type(exc).__name__}: {exc}")
            return False
        return True

    async def _execute(self, batch: list[_Op]) -> list[Any] | None:
        pipe = self._client.pipeline(transaction=False)
        for op in batch:
            pipe.evalsha(self._sha[op.name], len(op.keys), *op.keys, *op.args)
        try:
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # connection refused, reset, timed out: the coordinator is gone
            self.lose(f"{type(exc).__name__}: {exc}")
            return None
        return replies

    def _send(self, batch: list[_Op], replies: list[Any] | None) -> list[_Op] | None:
        """Hand each op its reply. Returns the ops to send again once the scripts are reloaded (Redis
        said it does not know the script, so it did not run), or None (everything pending failed)
        once the coordinator is lost."""
        if replies is None:
            return None
        resend = []
        for op, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception) and "No matching script" in str(reply) and op.reloads == 0:
                op.reloads += 1
                resend.append(op)
            elif isinstance(reply, Exception):
                self.lose(f"script {op.name} failed: {reply}")
            elif reply[0] == -1:
                self.lose(
                    "the namespace's state is gone (Redis restarted without persistence or was flushed)"
                )
            elif not op.fut.done():
                op.fut.set_result(reply)
            if self.lost is not None:
                return None
        return resend

    def lose(self, why: str) -> None:
        """Mark the coordinator lost: every queued and later script fails with CoordinationLost."""
        if self.lost is None:
            self.lost = CoordinationLost(
                f"lost the Redis coordinator at {self.shown}: {why}; nothing more is sent, "
                "since no request may go out without a reservation on the shared budget"
            )
            _log.warning("coordination_lost", url=self.shown, reason=why)
            for callback in self.on_lost:
                callback()
        self._fail_pending(self.lost)

    def _fail_pending(self, error: CoordinationLost) -> None:
        ops = [*self._sending, *self._queue]
        self._sending, self._queue = set(), []
        for op in ops:
            if not op.fut.done():
                op.fut.set_exception(error)
                op.fut.exception()  # retrieved: posted scripts have no awaiter to read it

    async def delete_namespace(self) -> int:
        """Delete every key of the namespace; returns how many."""
        deleted = 0
        async for batch in _scan_batches(self._client, self.prefix):
            deleted += await self._client.unlink(*batch)
        return deleted


async def _scan_batches(client: Any, prefix: str) -> Any:
    batch: list[bytes] = []
    async for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            yield batch
            batch = []
    if batch:
        yield batch


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


@attrs.define(slots=True)
class _Leased(Reservation):
    """A reservation in Redis: `id` names it there, `nano` is its worst case in nanodollars."""

    id: str = ""
    nano: int = 0


class _SharedLedger:
    """The budget ledger over Redis (see the module doc); same methods as `BudgetLedger`."""

    def __init__(self, link: _Link, budget: Budget | None, lease: float, poll: float) -> None:
        self.budget = budget
        self._link = link
        self._keys = (link.key("budget"), link.key("leases"), link.key("reservations"))
        self._lease_us = int(lease * 1e6)
        self._poll = poll
        self._ids = itertools.count()
        self.open_ids: set[str] = set()
        self._totals: list[int] = [0] * len(_lua.TOTALS)
        self._limits: tuple[int, int] = (-1, -1)
        self._changed = asyncio.Event()
        self._turn: asyncio.Lock | None = None
        self.ready = False
        if (
            budget is not None
            and budget.usd is not None
            and usd_to_pico(budget.usd) // _PICO_PER_NANO >= _MAX_NANO
        ):
            raise ConfigError(f"a shared USD budget must be below $9,000,000, got {budget.usd!r}")

    def _wanted(self) -> tuple[str, str]:
        b = self.budget
        if b is None:
            return "", ""
        tokens = -1 if b.tokens is None else b.tokens
        nano = -1 if b.usd is None else usd_to_pico(b.usd) // _PICO_PER_NANO  # a limit rounds down
        return str(tokens), str(nano)

    async def init(self) -> None:
        """Store this worker's budget for the namespace, or check it matches the stored one."""
        lt, ln = self._wanted()
        reply = await self._link.call("budget_init", self._keys, (lt, ln))
        self._adopt(reply)
        stored_t, stored_n = self._limits = (self._totals[10], self._totals[11])
        if lt and (str(stored_t), str(stored_n)) != (lt, ln):
            raise ConfigError(
                f"namespace {self._link.prefix!r} on {self._link.shown} already holds the budget "
                f"{_describe_limits(stored_t, stored_n)}; this worker asked for "
                f"{_describe_limits(int(lt), int(ln))}. "
                "Give every worker the same Budget, or clear the namespace (RedisCoordination.clear())"
            )
        self.ready = True

    @property
    def limited(self) -> bool:
        """Whether the namespace has a budget."""
        return self._limits[0] >= 0 or self._limits[1] >= 0

    def _adopt(self, reply: list[Any]) -> None:
        # Unset limits (fields 10, 11) mean "no limit" (-1); unset counters are 0.
        fields = reply[1].split(b",")
        self._totals = [int(v) if v else -1 if i >= 10 else 0 for i, v in enumerate(fields)]

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def spend(self) -> Spend:
        """Spend and reservations of every worker, as of the last script this worker ran."""
        _, sn, rt, rn, inp, out, cached, unknown, requests = self._totals[:9]
        return Spend(
            input_tokens=inp,
            output_tokens=out,
            cached_tokens=cached,
            unknown_tokens=unknown,
            usd=sn * _PICO_PER_NANO / _PICO_PER_USD,
            requests=requests,
            reserved_tokens=rt,
            reserved_usd=rn * _PICO_PER_NANO / _PICO_PER_USD,
        )

    @property
    def expired_leases(self) -> int:
        """Reservations charged in full because their worker stopped renewing them."""
        return self._totals[9]

    async def refresh(self) -> Spend:
        """Read the shared totals now (charging leases that ran out on the way)."""
        self._adopt(await self._link.call("budget_init", self._keys, ("", "")))
        return self.spend()

    def try_reserve(
        self,
        tokens: int,
        pico: int,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        input_ceiling: int | None = None,
    ) -> Reservation | None:
        """Never without waiting: only Redis can say whether it fits."""
        return None

    async def _attempt(self, res: _Leased) -> int:
        self.open_ids.add(res.id)
        fut = self._link.submit("reserve", self._keys, (res.id, res.tokens, res.nano, self._lease_us))
        try:
            reply = await asyncio.shield(fut)
        except BaseException:
            # Cancelled while the script may still run: once it has answered, give back what it took.
            self.open_ids.discard(res.id)
            fut.add_done_callback(lambda f: self._release_orphan(f, res.id))
            raise
        self._adopt(reply)
        status = int(reply[0])
        if status != 0:
            self.open_ids.discard(res.id)
        if status == 2:
            raise self._exceeded(res)
        return status

    def _release_orphan(self, fut: asyncio.Future[list[Any]], rid: str) -> None:
        if not fut.cancelled() and fut.exception() is None and int(fut.result()[0]) == 0:
            self._link.post("close", self._keys, (rid, "release", 0, 0, 0, 0), then=self._closed)

    def _exceeded(self, res: _Leased) -> BudgetExceeded:
        spent = self.spend()
        lt, ln = self._totals[10], self._totals[11]
        parts = []
        if lt >= 0:
            parts.append(f"{spent.tokens} of {lt} tokens spent, next needs up to {res.tokens}")
        if ln >= 0:
            parts.append(f"${spent.usd:.6f} of ${ln / 1e9:.6f} spent, next needs up to ${res.nano / 1e9:.6f}")
        return BudgetExceeded("shared budget exhausted: " + "; ".join(parts), spent=spent)

    async def reserve(
        self,
        tokens: int,
        pico: int,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        input_ceiling: int | None = None,
    ) -> Reservation:
        """Reserve on the shared budget; while in-flight requests hold the room, wait in line (FIFO
        within this worker, polling every `poll` seconds for other workers' settlements). The keywords
        are `BudgetLedger.reserve`'s: what `settle` checks an answer's usage against."""
        res = _Leased(
            tokens,
            pico,
            True,
            input_tokens,
            output_tokens,
            input_ceiling,
            id=f"{self._link.owner}.{next(self._ids)}",
            nano=-(-pico // _PICO_PER_NANO),
        )
        if await self._attempt(res) == 0:
            return res
        if self._turn is None:
            self._turn = asyncio.Lock()
        async with self._turn:
            while True:
                if await self._attempt(res) == 0:
                    return res
                changed = self._changed
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=self._poll)

    def _close(self, res: Reservation, mode: str, usage: Usage | None = None, pico: int = 0) -> bool:
        if not res.open or not isinstance(res, _Leased):
            return False
        res.open = False
        self.open_ids.discard(res.id)
        u = usage or Usage()
        nano = -(-pico // _PICO_PER_NANO)  # a charge rounds up
        self._link.post(
            "close",
            self._keys,
            (res.id, mode, u.input_tokens, u.output_tokens, u.cached_tokens, nano),
            then=self._closed,
        )
        return True

    def _closed(self, reply: list[Any]) -> None:
        self._adopt(reply)
        self._wake()

    def release(self, res: Reservation) -> None:
        """Nothing was spent: free the room (queued)."""
        self._close(res, "release")

    def charge_reserved(self, res: Reservation) -> None:
        """The outcome is unknown: spend the whole reservation (queued)."""
        self._close(res, "charge")

    def settle(self, res: Reservation, usage: Usage | None, pico: int) -> bool:
        """Spend the actual usage (queued); False when it exceeded the reservation. The rules are
        `BudgetLedger.settle`'s: no usage is charged the reservation; an impossible one too, and raises
        BadResponse."""
        if usage is None:
            self.charge_reserved(res)
            return True
        problem = impossible_usage(usage, res)
        if problem is not None:
            self.charge_reserved(res)
            raise BadResponse(f"the answer reports an impossible usage ({problem}); charged its reservation")
        if not self._close(res, "settle", usage, pico):
            return True
        tokens = usage.input_tokens + usage.output_tokens
        within = res.input_tokens is None or usage.input_tokens <= res.input_tokens
        return within and (not self.limited or (tokens <= res.tokens and pico <= res.pico))


def _describe_limits(tokens: int, nano: int) -> str:
    parts = []
    if tokens >= 0:
        parts.append(f"tokens={tokens}")
    if nano >= 0:
        parts.append(f"usd={nano / 1e9:g}")
    return "Budget(" + ", ".join(parts) + ")" if parts else "no limit"


class _SharedLimiter:
    """The RPM/TPM limiter over Redis (see the module doc); same methods as `RateLimiter`."""

    def __init__(
        self,
        link: _Link,
        scope: str,
        rpm: float | None,
        tpm: float | None,
        coordination: RedisCoordination,
        max_pause: float,
    ) -> None:
        check_number("max_pause", max_pause, strict=False, unit="seconds")
        self._link = link
        self._key = link.key("rate", scope)
        self._c = coordination
        self._ceiling = (check_rate("rpm", rpm), check_rate("tpm", tpm))
        self._effective = self._ceiling
        self.max_pause = float(max_pause)
        self._paused_until = 0.0

    @property
    def active(self) -> bool:
        """Whether `acquire` may have to wait: a limit is configured, or this worker saw a pause."""
        return self._ceiling != (None, None) or self._paused_until > 0

    @property
    def rpm(self) -> float | None:
        """Effective requests per minute (as of the last acquisition)."""
        return self._effective[0]

    @property
    def tpm(self) -> float | None:
        """Effective tokens per minute (as of the last acquisition)."""
        return self._effective[1]

    def set_limits(self, *, rpm: float | None, tpm: float | None) -> None:
        """Change this worker's configured ceilings (give every worker the same)."""
        self._ceiling = self._effective = (check_rate("rpm", rpm), check_rate("tpm", tpm))

    def _lowered(self, ceiling: float | None, reported: int | None, floor: float) -> float:
        if ceiling is None or reported is None or reported <= 0:
            return 0.0
        value = max(float(reported), self._c.rate_floor * ceiling, floor)
        return value if value < ceiling else 0.0

    def observe(self, info: RateLimitInfo) -> None:
        """Lower every worker's limits to what the API reports (floored, expiring); pause on empty."""
        rpm = self._lowered(self._ceiling[0], info.requests_limit, RateLimiter.MIN_RPM)
        tpm = self._lowered(self._ceiling[1], info.tokens_limit, RateLimiter.MIN_TPM)
        if rpm or tpm:
            self._link.post("adjust", (self._key,), (rpm, tpm, int(self._c.rate_ttl * 1e6), 0))
        if info.requests_remaining == 0:
            effective = self._effective[0]
            if effective is not None:
                self.pause(60.0 / effective)

    def pause(self, seconds: float) -> None:
        """Start nothing, on any worker, for `seconds` (at most `max_pause`)."""
        seconds = min(max(0.0, seconds), self.max_pause)
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        self._paused_until = max(self._paused_until, loop.time() + seconds)
        self._link.post("adjust", (self._key,), (0, 0, 0, int(seconds * 1e6)))

    async def acquire(self, tokens: int, *, max_wait: float | None = None) -> None:
        """Book a start slot on the shared schedule and wait for it. With `max_wait`, a start further
        away than that is not booked and raises `RequestTimeout` at once."""
        rpm, tpm = self._ceiling
        wait = 0.0
        local = self._paused_until - asyncio.get_running_loop().time()
        if rpm is not None or tpm is not None:
            # The local pause counts against max_wait too: the script books only what can be used.
            budget_us = -1 if max_wait is None else max(0, int((max_wait - max(local, 0.0)) * 1e6))
            reply = await self._link.call("acquire", (self._key,), (tokens, rpm or 0, tpm or 0, budget_us))
            wait = int(reply[1]) / 1e6
            er, et = float(reply[2]), float(reply[3])
            self._effective = (er if er > 0 else None, et if et > 0 else None)
            if int(reply[0]) == 1:
                raise RequestTimeout(
                    f"shared rate limit: the next start is {wait:.3g} s away, past this request's "
                    f"timeout of {max_wait:g} s",
                    status=None,
                )
        wait = max(wait, local)
        if max_wait is not None and wait > max_wait:
            raise RequestTimeout(
                f"paused: the next start is {wait:.3g} s away, past this request's timeout of {max_wait:g} s",
                status=None,
            )
        if wait > 0:
            await asyncio.sleep(wait)


def _decode(raw: bytes) -> CachedValue | None:
    """A stored value, or None when it is not what `put` writes (another writer, a damaged entry)."""
    try:
        doc = json.loads(raw)
        counts = doc["u"]
        if not (isinstance(counts, list) and len(counts) == 3 and all(is_int(c) and c >= 0 for c in counts)):
            return None
        return CachedValue(doc["v"], Usage(*counts))
    except (ValueError, TypeError, KeyError):
        return None


class _SharedCache:
    """The response cache over Redis (see the module doc); same methods as `ResponseCache`."""

    def __init__(self, link: _Link, coordination: RedisCoordination) -> None:
        self._link = link
        self._c = coordination
        self._memory: OrderedDict[str, CachedValue] = OrderedDict()
        self.claims: set[str] = set()
        self.write_errors = 0
        self.damaged = 0
        self._index = link.key("cache", "index")
        self._values = link.key("cache", "v", "")
        self._flights = link.key("cache", "f", "")

    def __len__(self) -> int:
        return len(self._memory)

    async def open(self) -> None:
        """Nothing to open: the coordination's connection serves the cache."""

    async def aclose(self) -> None:
        """Nothing to close (the coordination sends what is queued when it closes)."""

    async def flush(self) -> None:
        """Wait until every stored result has reached Redis."""
        await self._link.drain()

    def get(self, key: str) -> CachedValue | None:
        """A result this worker already holds (no I/O)."""
        hit = self._memory.get(key)
        if hit is not None:
            self._memory.move_to_end(key)
        return hit

    def on_disk(self, key: str) -> bool:
        """Always True: only Redis knows what other workers stored."""
        return True

    def _remember(self, key: str, hit: CachedValue) -> None:
        self._memory[key] = hit
        if len(self._memory) > self._c.memory_entries:
            self._memory.popitem(last=False)

    async def load(self, key: str, check: Callable[[Any], bool] | None = None) -> CachedValue | None:
        """Redis's value for `key`; on a miss this worker claims the key (and computes it), unless another
        worker holds the claim: then wait for its result, at most `dedup_wait` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._c.dedup_wait
        delay = 0.002
        lease_ms = int(self._c.lease * 1000)
        while True:
            claim = 1 if loop.time() < deadline else 0
            reply = await self._link.call(
                "lookup", (self._values + key, self._flights + key), (self._link.owner, lease_ms, claim)
            )
            status = int(reply[0])
            if status == 1:
                hit = _decode(reply[1])
                if hit is None or (check is not None and not check(hit.value)):
                    self.damaged += 1  # a miss: asked again, and the fresh answer replaces it
                    _log.warning("cache_value_damaged", namespace=self._link.prefix, key=key[:16])
                    return None
                self._remember(key, hit)
                return hit
            if status == 2:
                self.claims.add(key)
            if status != 3:
                return None
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.1)

    def put(self, key: str, value: Any, usage: Usage) -> None:
        """Keep the result in memory and queue it for Redis (with its TTL, under the entry cap)."""
        self._remember(key, CachedValue(value, usage))
        try:
            text = json.dumps(
                {"v": value, "u": [usage.input_tokens, usage.output_tokens, usage.cached_tokens]},
                separators=(",", ":"),
                ensure_ascii=False,
                allow_nan=False,
            ).encode()
        except (TypeError, ValueError):
            self.write_errors += 1
            self.abandon(key)
            return
        if len(text) > self._c.max_value_bytes:
            self.abandon(key)
            return
        self.claims.discard(key)
        self._link.post(
            "put",
            (self._values + key, self._flights + key, self._index),
            (
                self._link.owner,
                text,
                int(self._c.cache_ttl * 1000),
                self._c.cache_max_entries,
                key,
                self._values,
            ),
        )

    def abandon(self, key: str) -> None:
        """Give up this worker's claim on `key` (its call failed): another worker may compute it."""
        if key in self.claims:
            self.claims.discard(key)
            self._link.post("claims", (), (self._link.owner, 0, self._flights, key))


class RedisCoordination:
    """Rate limits, a hard budget and a response cache shared by every worker on one Redis namespace.

    Pass it to `Scheduler(shared=...)`; see this module's doc for what is shared and how. Settings:
    `url` (redis:// or rediss://; a password in it is never shown), `namespace` (letters, digits,
    `_.-`, up to 64; teams that must not share limits or budgets use different ones), `lease` (seconds
    a reservation or cache claim outlives its worker), `timeout` (seconds per Redis round trip before
    the coordinator counts as lost), `poll` (seconds between budget checks while waiting for room that
    another worker holds), the cache's `cache_ttl`, `cache_max_entries`, `max_value_bytes`,
    `memory_entries` (this worker's copy), `dedup_wait`, and the limiter's `rate_floor` and `rate_ttl`.
    Every scheduler of every worker should be given the same rpm/tpm, Budget and RetryPolicy.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str,
        lease: float = 10.0,
        timeout: float = 2.0,
        poll: float = 0.01,
        cache_ttl: float = 7 * 24 * 3600.0,
        cache_max_entries: int = 1_000_000,
        max_value_bytes: int = 1 << 20,
        memory_entries: int = 10_000,
        dedup_wait: float = 60.0,
        rate_floor: float = 0.1,
        rate_ttl: float = 60.0,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"url must be a redis://, rediss:// or unix:// URL, got {mask_url(str(url))!r}")
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ConfigError(
                f"namespace must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or "
                f"digit), got {namespace!r:.80}"
            )
        for name, value in (
            ("lease", lease),
            ("timeout", timeout),
            ("poll", poll),
            ("cache_ttl", cache_ttl),
            ("dedup_wait", dedup_wait),
            ("rate_ttl", rate_ttl),
        ):
            check_number(name, value, unit="seconds")
        for name, count in (
            ("cache_max_entries", cache_max_entries),
            ("max_value_bytes", max_value_bytes),
            ("memory_entries", memory_entries),
        ):
            check_number(name, count, integer=True)
        check_number("rate_floor", rate_floor)
        if rate_floor > 1:
            raise ConfigError(f"rate_floor is a fraction of the configured limit (0..1], got {rate_floor!r}")
        if lease < 3 * timeout:
            raise ConfigError(
                f"lease ({lease} s) must be at least 3 x timeout ({timeout} s): it is renewed every lease/3"
            )
        self.url, self.namespace = url, namespace
        password = _password(url)
        if password:
            register_secret(password)  # a redis-py error that quotes the URL is masked in every log event
        self.lease, self.timeout, self.poll = float(lease), float(timeout), float(poll)
        self.cache_ttl, self.cache_max_entries = float(cache_ttl), cache_max_entries
        self.max_value_bytes, self.memory_entries = max_value_bytes, memory_entries
        self.dedup_wait = float(dedup_wait)
        self.rate_floor, self.rate_ttl = float(rate_floor), float(rate_ttl)
        self._link = _Link(url, namespace, self.timeout)
        self._ledgers: list[_SharedLedger] = []
        self._caches: list[_SharedCache] = []
        self._users = 0
        self._renewer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"RedisCoordination({self._link.shown!r}, namespace={self.namespace!r})"

    @property
    def lost(self) -> CoordinationLost | None:
        """The error every call gets once the coordinator was lost (None while it answers)."""
        return self._link.lost

    # -- the Coordination protocol ---------------------------------------------------------------------

    def limiter(
        self, scope: str, rpm: float | None, tpm: float | None, *, max_pause: float = 60.0
    ) -> _SharedLimiter:
        """The shared limiter of `scope` ("*": every model; else one model's); a pause lasts at most
        `max_pause` seconds (the scheduler passes its `RetryPolicy.max_retry_after`)."""
        return _SharedLimiter(self._link, scope, rpm, tpm, self, max_pause)

    def ledger(self, budget: Budget | None) -> _SharedLedger:
        """The namespace's budget ledger (checked against the stored budget at open)."""
        ledger = _SharedLedger(self._link, budget, self.lease, self.poll)
        self._ledgers.append(ledger)
        return ledger

    def cache(self) -> _SharedCache:
        """The namespace's response cache."""
        cache = _SharedCache(self._link, self)
        self._caches.append(cache)
        return cache

    async def open(self) -> None:
        """Connect (a ConfigError naming the URL when Redis cannot be reached) and check the budget."""
        if self._users == 0:
            await self._link.connect()
            if self._wake_all not in self._link.on_lost:
                self._link.on_lost.append(self._wake_all)
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew(), name="evomerge-redis-leases"
            )
        self._users += 1
        try:
            for ledger in self._ledgers:
                if not ledger.ready:
                    await ledger.init()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Send what is queued (settlements, cache writes) and disconnect. Shielded: a caller cancelled
        on its way out (a timeout, a task group's failure) would otherwise leave the pumps running and
        the connection open; every wait in here is bounded by `timeout`."""
        if self._users == 0:
            return
        self._users -= 1
        if self._users > 0:
            return
        with anyio.CancelScope(shield=True):
            renewer, self._renewer = self._renewer, None
            if renewer is not None:
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
            for ledger in self._ledgers:
                if ledger.ready and self._link.lost is None:
                    with contextlib.suppress(CoordinationLost):
                        await ledger.refresh()
            await self._link.disconnect()
            for ledger in self._ledgers:
                ledger.ready = False

    async def __aenter__(self) -> RedisCoordination:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def spent(self) -> Spend:
        """The namespace's spend and reservations now (every worker's), charging expired leases first."""
        ledger = self._ledgers[0] if self._ledgers else self.ledger(None)
        if not ledger.ready:
            await ledger.init()
        return await ledger.refresh()

    async def clear(self) -> int:
        """Delete the namespace's keys (its budget, spend, limiter state and cache); returns how many."""
        if self._users == 0:
            raise UsageError("open the RedisCoordination first (async with RedisCoordination(...) as c:)")
        return await self._link.delete_namespace()

    def _wake_all(self) -> None:
        for ledger in self._ledgers:
            ledger._wake()

    async def _renew(self) -> None:
        """Every lease/3 seconds, extend the leases of this worker's open reservations and claims."""
        period = self.lease / 3
        while True:
            await asyncio.sleep(period)
            link = self._link
            try:
                for ledger in self._ledgers:
                    ids = sorted(ledger.open_ids)
                    for i in range(0, len(ids), 1000):
                        await link.call("renew", ledger._keys, (int(self.lease * 1e6), *ids[i : i + 1000]))
                claims = sorted(set().union(*(c.claims for c in self._caches))) if self._caches else []
                for i in range(0, len(claims), 1000):
                    await link.call(
                        "claims",
                        (),
                        (
                            link.owner,
                            int(self.lease * 1000),
                            link.key("cache", "f", ""),
                            *claims[i : i + 1000],
                        ),
                    )
            except CoordinationLost:
                return
