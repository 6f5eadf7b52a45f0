"""Client-side rate limiting with the generic cell rate algorithm (GCRA).

Client side (`RateLimiter`): requests are spaced so that no window of time ever holds more requests or
tokens than the configured per-minute rates allow (zero burst tolerance, so the flow is smooth). Each
caller reserves its start time when it asks ("reserve, then sleep"), which keeps the limiter O(1) per
request and first-come-first-served, with no background task. The limits can change at run time (the
scheduler lowers them to what the API's `x-ratelimit-*` headers report) and a 429 pauses everyone.

The server side of the same arithmetic (`Gcra`, with a burst tolerance) lives with the only server
that enforces limits, `evomerge_sdk.local.faults`.

What a server can make the client limiter do is bounded (a hostile or broken server must not stall a
run): a pause, whether a 429's Retry-After or an empty bucket in the headers, lasts at most `max_pause`
seconds (the scheduler passes its `RetryPolicy.max_retry_after`); a header-driven cut never lowers the
rates below `MIN_RPM` requests and `MIN_TPM` tokens per minute (a report under those is no real API
tier; it is clamped); and `acquire(max_wait=...)` refuses at once, with `RequestTimeout`, a start it
would have to wait longer for. A shared backend (Redis) applies the same three rules.

The timing arithmetic is pure (`RateSchedule` takes `now` as an argument), so it is tested with
property tests on a simulated clock; only `RateLimiter.acquire` touches the event loop.
"""

from __future__ import annotations

import math

import anyio

from .._checks import check_number
from ..errors import RequestTimeout
from ..providers import RateLimitInfo

__all__ = ["RateLimiter", "RateSchedule", "check_rate"]


def check_rate(name: str, value: float | None) -> float | None:
    """Validate a per-minute rate: None (no limit) or a finite number > 0."""
    check_number(name, value, allow_none=True, unit="per minute")
    return None if value is None else float(value)


class RateSchedule:
    """Start times for requests under an RPM and a TPM limit, smooth, on a caller-supplied clock.

    Request k may start at max(now, previous start + 60/rpm, previous start + previous tokens * 60/tpm),
    so consecutive starts are never closer than the rates allow and no capacity is left idle while
    callers wait.
    """

    __slots__ = ("_next_request", "_next_token", "paused_until", "rpm", "tpm")

    def __init__(self, rpm: float | None = None, tpm: float | None = None) -> None:
        self.rpm = check_rate("rpm", rpm)
        self.tpm = check_rate("tpm", tpm)
        self._next_request = -math.inf
        self._next_token = -math.inf
        self.paused_until = -math.inf

    @property
    def unlimited(self) -> bool:
        """True when neither rate is limited."""
        return self.rpm is None and self.tpm is None

    def reserve(self, now: float, tokens: int) -> tuple[float, tuple[float, float]]:
        """Book the next start time for a request of `tokens`; returns it and the undo state."""
        undo = (self._next_request, self._next_token)
        slot = max(now, self._next_request, self._next_token, self.paused_until)
        if self.rpm is not None:
            self._next_request = slot + 60.0 / self.rpm
        if self.tpm is not None:
            self._next_token = slot + tokens * 60.0 / self.tpm
        return slot, undo

    def is_last(self, slot: float, tokens: int) -> bool:
        """Whether the booking at `slot` is still the most recent one (so undoing it is safe)."""
        req_ok = self.rpm is None or self._next_request == slot + 60.0 / self.rpm
        tok_ok = self.tpm is None or self._next_token == slot + tokens * 60.0 / self.tpm
        return req_ok and tok_ok

    def undo(self, state: tuple[float, float]) -> None:
        """Give back the last booking (its caller was cancelled before starting)."""
        self._next_request, self._next_token = state

    def pause(self, now: float, seconds: float) -> None:
        """Start nothing before now + seconds (after a 429, or when the API says no capacity is left)."""
        until = now + max(0.0, seconds)
        if until > self.paused_until:
            self.paused_until = until
            self._next_request = max(self._next_request, until)
            self._next_token = max(self._next_token, until)


class RateLimiter:
    """Smooth RPM/TPM limiter for async callers (see module doc). Limits are per minute; None = none.

    The configured limits are ceilings: `observe` lowers the effective limits to what the API reports,
    never above what the user configured and never below the floors `MIN_RPM` / `MIN_TPM`. A pause
    lasts at most `max_pause` seconds, whatever the server asked for.
    """

    MIN_RPM = 1.0
    """Floor of a header-driven requests-per-minute cut (the lowest real API tiers allow 3)."""
    MIN_TPM = 1_000.0
    """Floor of a header-driven tokens-per-minute cut (real tiers allow tens of thousands)."""

    def __init__(
        self, rpm: float | None = None, tpm: float | None = None, *, max_pause: float = 60.0
    ) -> None:
        check_number("max_pause", max_pause, strict=False, unit="seconds")
        self._schedule = RateSchedule(rpm, tpm)
        self._ceiling = (self._schedule.rpm, self._schedule.tpm)
        self.max_pause = float(max_pause)
        self._paused = False  # fast path: nothing to check while no limit and no pause exists

    @property
    def active(self) -> bool:
        """Whether `acquire` may have to wait (a limit is set or a pause was ever asked for)."""
        return self._paused or not self._schedule.unlimited

    @property
    def rpm(self) -> float | None:
        """Effective requests-per-minute limit (None: unlimited)."""
        return self._schedule.rpm

    @property
    def tpm(self) -> float | None:
        """Effective tokens-per-minute limit (None: unlimited)."""
        return self._schedule.tpm

    def set_limits(self, *, rpm: float | None, tpm: float | None) -> None:
        """Change the configured limits at run time; they apply to requests not yet booked."""
        rpm, tpm = check_rate("rpm", rpm), check_rate("tpm", tpm)
        self._ceiling = (rpm, tpm)
        self._schedule.rpm, self._schedule.tpm = rpm, tpm

    def observe(self, info: RateLimitInfo) -> None:
        """Adopt what the API's rate-limit headers say: lower limits, and a pause when nothing is left."""
        ceil_rpm, ceil_tpm = self._ceiling
        s = self._schedule
        if info.requests_limit is not None and info.requests_limit > 0:
            limit = max(self.MIN_RPM, float(info.requests_limit))
            s.rpm = limit if ceil_rpm is None else min(ceil_rpm, limit)
        if info.tokens_limit is not None and info.tokens_limit > 0:
            limit = max(self.MIN_TPM, float(info.tokens_limit))
            s.tpm = limit if ceil_tpm is None else min(ceil_tpm, limit)
        if info.requests_remaining == 0 and s.rpm is not None:
            # The API's bucket is empty: one request's worth refills in 60/limit seconds.
            self.pause(60.0 / s.rpm)

    def pause(self, seconds: float) -> None:
        """Hold every request not yet started for `seconds`, at most `max_pause` (a 429's Retry-After
        applies to all; a longer demand fails only the request that got it, in the retry policy)."""
        self._paused = True
        self._schedule.pause(anyio.current_time(), min(seconds, self.max_pause))

    async def acquire(self, tokens: int, *, max_wait: float | None = None) -> None:
        """Wait until a request of `tokens` may start. Cancelling a waiter gives its slot back if it can.

        With `max_wait`, a start further away than that raises `RequestTimeout` at once (its booking given
        back), instead of sleeping into a wait the caller's timeout would end anyway.
        """
        s = self._schedule
        if s.unlimited and not self._paused:
            return
        deadline = None if max_wait is None else anyio.current_time() + max_wait
        while True:
            now = anyio.current_time()
            slot, undo = s.reserve(now, tokens)
            if slot <= now:
                return
            if deadline is not None and slot > deadline:
                if s.is_last(slot, tokens):
                    s.undo(undo)
                raise RequestTimeout(
                    f"rate limit: the next start is {slot - now:.3g} s away, past this request's "
                    f"timeout of {max_wait:g} s",
                    status=None,
                )
            try:
                await anyio.sleep(slot - now)
            except BaseException:
                if s.is_last(slot, tokens):
                    s.undo(undo)
                raise
            if slot >= s.paused_until:
                return
            # A pause arrived while we slept: book again behind it instead of bursting at its end.
