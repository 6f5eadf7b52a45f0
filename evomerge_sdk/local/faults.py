"""Server-side pieces shared by the loopback servers: fault injection, RPM/TPM enforcement, accounting.

`FaultInjector` is an aiohttp middleware factory. Per request, in this order, it:

1. enforces `ServerLimits` (RPM/TPM with the GCRA of `evomerge_sdk.scheduler._limiter`, a burst tolerance
   like a real API's), answering 429 with `Retry-After`, `retry-after-ms` and `x-ratelimit-*` headers;
2. injects the faults of `FaultConfig` before the handler runs: 429 with `Retry-After`, 500/503, a slow
   answer, a hang (no answer for a long time), plus a fixed added latency;
3. runs the handler, then injects the faults that happen after the work was done (the tokens count as
   served): a dropped connection, or a 200 whose JSON body is malformed;
4. counts what it served in `ServerStats` (statuses, 429s, tokens the handler reported with
   `record_served`).

Fault decisions are deterministic: they depend on the seed, the request (method, path, body) and how
many times this same request was seen before, never on arrival order, so a run with faults is
reproducible under any concurrency. `max_faults_per_request` bounds the faults one request can get,
so a client that retries enough always gets through.
"""

from __future__ import annotations

import contextvars
import hashlib
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import attrs
from aiohttp import web

from .._checks import check_number
from .._validators import number, probability
from ..errors import ConfigError

__all__ = [
    "FaultConfig",
    "FaultInjector",
    "Gcra",
    "ServerLimits",
    "ServerStats",
    "format_duration",
    "record_served",
]

# What the handler of the current request reported (a context variable: version-proof, no request keys).
_served: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("evomerge_served", default=None)
TokenCost = Callable[[web.Request], Awaitable[int]]
_FAULT_ORDER = ("rate_limit", "server_error", "hang", "slow", "drop", "malformed")


_RATE = probability(prefix="FaultConfig.")
_SECONDS = number(strict=False, unit="seconds", prefix="FaultConfig.")
_PER_MINUTE = number(allow_none=True, unit="per minute", prefix="ServerLimits.")


@attrs.frozen
class FaultConfig:
    """What to inject, and how often (probabilities per request; their sum must not exceed 1)."""

    seed: int = 0
    rate_limit_rate: float = attrs.field(default=0.0, validator=_RATE)
    retry_after: float = attrs.field(default=0.05, validator=_SECONDS)
    error_rate: float = attrs.field(default=0.0, validator=_RATE)
    hang_rate: float = attrs.field(default=0.0, validator=_RATE)
    hang_seconds: float = attrs.field(default=30.0, validator=_SECONDS)
    slow_rate: float = attrs.field(default=0.0, validator=_RATE)
    slow_seconds: float = attrs.field(default=0.2, validator=_SECONDS)
    drop_rate: float = attrs.field(default=0.0, validator=_RATE)
    malformed_rate: float = attrs.field(default=0.0, validator=_RATE)
    latency: float = attrs.field(default=0.0, validator=_SECONDS)
    max_faults_per_request: int | None = attrs.field(
        default=2, validator=number(integer=True, strict=False, allow_none=True, prefix="FaultConfig.")
    )

    def __attrs_post_init__(self) -> None:
        """Cross-field invariant: the fault rates are one request's probabilities, so they sum to <= 1."""
        total = sum(self._rates())
        if total > 1 + 1e-12:
            raise ConfigError(
                f"FaultConfig rates sum to {total:.3f}; they are per-request probabilities (<= 1)"
            )

    def _rates(self) -> tuple[float, ...]:
        return (
            self.rate_limit_rate,
            self.error_rate,
            self.hang_rate,
            self.slow_rate,
            self.drop_rate,
            self.malformed_rate,
        )

    @property
    def active(self) -> bool:
        """Whether anything is injected at all."""
        return self.latency > 0 or any(r > 0 for r in self._rates())

    def decide(self, request_digest: bytes, occurrence: int) -> str | None:
        """The fault for the `occurrence`-th sighting of a request (None: serve normally)."""
        h = hashlib.sha256(b"%d|%d|" % (self.seed, occurrence) + request_digest).digest()
        u = int.from_bytes(h[:8], "big") / 2.0**64
        for kind, rate in zip(_FAULT_ORDER, self._rates(), strict=True):
            if u < rate:
                return kind
            u -= rate
        return None


@attrs.frozen
class ServerLimits:
    """Server-side rate limits, per minute; `burst_seconds` is the GCRA tolerance (how far ahead of a
    smooth schedule a client may run before it gets 429s)."""

    rpm: float | None = attrs.field(default=None, validator=_PER_MINUTE)
    tpm: float | None = attrs.field(default=None, validator=_PER_MINUTE)
    burst_seconds: float = attrs.field(
        default=1.0, validator=number(strict=False, unit="seconds", prefix="ServerLimits.")
    )


@attrs.define
class ServerStats:
    """What a server saw and served. `served_*` counts work done, including answers lost afterwards."""

    requests: int = 0
    statuses: Counter[int] = attrs.field(factory=Counter)
    rate_limited: int = 0  # 429s from limit enforcement
    injected: Counter[str] = attrs.field(factory=Counter)  # injected faults by kind
    served_requests: int = 0
    served_input_tokens: int = 0
    served_output_tokens: int = 0
    first_admitted: float | None = None
    last_admitted: float | None = None

    @property
    def served_tokens(self) -> int:
        """Input + output tokens of all work done."""
        return self.served_input_tokens + self.served_output_tokens

    @property
    def total_429s(self) -> int:
        """Every 429 answered, enforced or injected."""
        return self.statuses.get(429, 0)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (for the /stats route of a server in another process)."""
        return {
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "rate_limited": self.rate_limited,
            "total_429s": self.total_429s,
            "injected": dict(self.injected),
            "served_requests": self.served_requests,
            "served_input_tokens": self.served_input_tokens,
            "served_output_tokens": self.served_output_tokens,
            "served_tokens": self.served_tokens,
            "first_admitted": self.first_admitted,
            "last_admitted": self.last_admitted,
        }

    def reset(self) -> None:
        """Zero every counter."""
        fresh = ServerStats()
        for field in attrs.fields(ServerStats):
            setattr(self, field.name, getattr(fresh, field.name))


def record_served(request: web.Request, input_tokens: int, output_tokens: int) -> None:
    """Called by a handler when it has done the work of a request (the middleware counts it)."""
    box = _served.get()
    if box is not None:
        box[:] = [1, input_tokens, output_tokens]


def format_duration(seconds: float) -> str:
    """OpenAI's `x-ratelimit-reset-*` style: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
    return web.json_response(body, status=status, headers=headers)


class Gcra:
    """Server-side GCRA: admit a request of `cost` now, or say how long until it would be admitted.

    `per_minute` is the rate (requests or tokens); `tolerance` (seconds) is how far ahead of the smooth
    schedule a client may run, i.e. the allowed burst is about `tolerance * per_minute / 60` units.
    """

    __slots__ = ("_tat", "interval", "per_minute", "tolerance")

    def __init__(self, per_minute: float, *, tolerance: float = 1.0) -> None:
        check_number("per_minute", per_minute, unit="per minute")
        check_number("tolerance", tolerance, strict=False, unit="seconds")
        rate = float(per_minute)
        self.per_minute = rate
        self.interval = 60.0 / rate
        self.tolerance = tolerance
        self._tat = -math.inf  # theoretical arrival time of the next unit

    def check(self, now: float) -> float:
        """Seconds until a request may be admitted (0.0: now). Does not admit."""
        return max(0.0, self._tat - self.tolerance - now - 1e-9)

    def admit(self, now: float, cost: float) -> None:
        """Record an admitted request of `cost` units."""
        self._tat = max(self._tat, now) + cost * self.interval

    def remaining(self, now: float) -> int:
        """Whole units that could be admitted right now (for `x-ratelimit-remaining-*`)."""
        headroom = self.tolerance + self.interval - (max(self._tat, now) - now)
        return max(0, math.floor(headroom / self.interval + 1e-9))

    def reset_seconds(self, now: float) -> float:
        """Seconds until the bucket is full again (for `x-ratelimit-reset-*`)."""
        return max(0.0, self._tat - now)


class FaultInjector:
    """Fault injection + rate-limit enforcement + served-token accounting, as one aiohttp middleware.

    `token_cost(request)` gives the tokens a request counts against TPM (a chat route: prompt tokens +
    max_tokens, as OpenAI counts); it is required when `limits.tpm` is set. Only POST requests (the work)
    whose path starts with one of `paths` are limited and faulted: health, stats, session lookups and
    deletions stay reachable, as a client's clean-up is never retried.
    """

    def __init__(
        self,
        faults: FaultConfig | None = None,
        limits: ServerLimits | None = None,
        *,
        stats: ServerStats | None = None,
        token_cost: TokenCost | None = None,
        paths: tuple[str, ...] = ("/v1/",),
    ) -> None:
        if limits is not None and limits.tpm is not None and token_cost is None:
            raise ConfigError("a TPM limit needs token_cost=... to know what each request costs")
        self.faults = faults or FaultConfig()
        self.limits = limits
        self.stats = stats if stats is not None else ServerStats()
        self._token_cost = token_cost
        self.paths = tuple(paths)
        self._seen: Counter[bytes] = Counter()
        self._faulted: Counter[bytes] = Counter()
        self._rpm = Gcra(limits.rpm, tolerance=limits.burst_seconds) if limits and limits.rpm else None
        self._tpm = Gcra(limits.tpm, tolerance=limits.burst_seconds) if limits and limits.tpm else None

    def install(self, app: web.Application) -> None:
        """Add the middleware to `app` (before it starts)."""
        app.middlewares.append(self.middleware)

    def _rate_headers(self, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        for gcra, unit in ((self._rpm, "requests"), (self._tpm, "tokens")):
            if gcra is not None:
                headers[f"x-ratelimit-limit-{unit}"] = str(int(gcra.per_minute))
                headers[f"x-ratelimit-remaining-{unit}"] = str(gcra.remaining(now))
                headers[f"x-ratelimit-reset-{unit}"] = format_duration(gcra.reset_seconds(now))
        return headers

    async def _enforce(self, request: web.Request, now: float) -> web.Response | None:
        cost = 0
        if self._tpm is not None:
            assert self._token_cost is not None
            cost = await self._token_cost(request)
        wait = max(
            self._rpm.check(now) if self._rpm is not None else 0.0,
            self._tpm.check(now) if self._tpm is not None else 0.0,
        )
        if wait > 0:
            self.stats.rate_limited += 1
            headers = self._rate_headers(now)
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
            return _error(
                429, f"Rate limit reached; retry in {wait * 1000:.0f} ms", "rate_limit_exceeded", headers
            )
        if self._rpm is not None:
            self._rpm.admit(now, 1)
        if self._tpm is not None:
            self._tpm.admit(now, cost)
        return None

    def _decide(self, request: web.Request, body: bytes) -> str | None:
        faults = self.faults
        if not faults.active:
            return None
        digest = hashlib.sha256(
            request.method.encode() + b" " + request.path_qs.encode() + b"\n" + body
        ).digest()
        occurrence = self._seen[digest]
        self._seen[digest] += 1
        cap = faults.max_faults_per_request
        if cap is not None and self._faulted[digest] >= cap:
            return None
        kind = faults.decide(digest, occurrence)
        if kind is not None:
            self._faulted[digest] += 1
            self.stats.injected[kind] += 1
        return kind

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The aiohttp middleware (see the class doc)."""
        if request.method != "POST" or not request.path.startswith(self.paths):
            return await handler(request)
        stats = self.stats
        stats.requests += 1
        response = await self._handle(request, handler)
        stats.statuses[response.status] += 1
        return response

    async def _handle(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        stats, faults = self.stats, self.faults
        now = anyio.current_time()
        limited = self._rpm is not None or self._tpm is not None
        if limited:
            refused = await self._enforce(request, now)
            if refused is not None:
                return refused
        if stats.first_admitted is None:
            stats.first_admitted = now
        stats.last_admitted = now
        body = await request.read() if faults.active else b""
        kind = self._decide(request, body)
        if kind == "rate_limit":
            headers = {
                "Retry-After": str(max(1, math.ceil(faults.retry_after))),
                "retry-after-ms": str(math.ceil(faults.retry_after * 1000)),
            }
            return _error(429, "Rate limit reached (injected)", "rate_limit_exceeded", headers)
        if kind == "server_error":
            status = 503 if hashlib.sha256(body).digest()[0] & 1 else 500
            return _error(status, "The server had an error (injected)", "server_error")
        if faults.latency > 0:
            await anyio.sleep(faults.latency)
        if kind == "hang":
            await anyio.sleep(faults.hang_seconds)
        elif kind == "slow":
            await anyio.sleep(faults.slow_seconds)
        box = [0, 0, 0]
        token = _served.set(box)
        try:
            response = await handler(request)
        finally:
            _served.reset(token)
        if box[0]:
            stats.served_requests += 1
            stats.served_input_tokens += box[1]
            stats.served_output_tokens += box[2]
        if limited:
            response.headers.update(self._rate_headers(anyio.current_time()))
        if kind == "drop":
            transport = request.transport
            if transport is not None:
                transport.close()  # the work is done, the answer is lost
            return response
        if kind == "malformed":
            return web.Response(
                status=200,
                body=b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess',
                content_type="application/json",
            )
        return response
