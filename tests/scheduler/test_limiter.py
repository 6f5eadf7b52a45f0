"""The GCRA limiter: property tests on a simulated clock, and the async limiter's bookkeeping."""

from __future__ import annotations

import math

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge_sdk import ConfigError, RateLimitInfo
from evomerge_sdk.local.faults import Gcra
from evomerge_sdk.scheduler import RateLimiter, RateSchedule

rates = st.one_of(st.none(), st.floats(min_value=1.0, max_value=1e6))
requests = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=5.0), st.integers(min_value=0, max_value=5000)),
    min_size=1,
    max_size=60,
)


def _schedule(rpm: float | None, tpm: float | None, reqs: list[tuple[float, int]]) -> list[float]:
    """Feed arrivals (gaps, costs) to a RateSchedule; return the start slots."""
    s = RateSchedule(rpm, tpm)
    now, slots = 0.0, []
    for gap, cost in reqs:
        now += gap
        slot, _ = s.reserve(now, cost)
        slots.append(slot)
    return slots


@settings(max_examples=200, deadline=None)
@given(rates, rates, requests)
def test_starts_are_spaced_by_the_rates_and_never_idle(
    rpm: float | None, tpm: float | None, reqs: list[tuple[float, int]]
) -> None:
    slots = _schedule(rpm, tpm, reqs)
    now = 0.0
    prev: tuple[float, int] | None = None
    for (gap, cost), slot in zip(reqs, slots, strict=True):
        now += gap
        earliest = now
        if prev is not None:
            p_slot, p_cost = prev
            assert slot >= p_slot  # first come, first served
            if rpm is not None:
                # float spacing at time t is ~t * 2e-16: tolerate it absolutely, not relatively
                assert slot - p_slot >= 60.0 / rpm - 1e-9
                earliest = max(earliest, p_slot + 60.0 / rpm)
            if tpm is not None:
                assert slot - p_slot >= p_cost * 60.0 / tpm - 1e-9
                earliest = max(earliest, p_slot + p_cost * 60.0 / tpm)
        assert slot == pytest.approx(earliest, abs=1e-9)  # no capacity left idle
        prev = (slot, cost)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1.0, max_value=1e5), requests, st.floats(min_value=0.01, max_value=100.0))
def test_no_window_holds_more_than_the_rate_allows(
    rpm: float, reqs: list[tuple[float, int]], width: float
) -> None:
    slots = _schedule(rpm, None, reqs)
    for i, start in enumerate(slots):
        inside = sum(1 for s in slots[i:] if s < start + width)
        assert inside <= math.floor(width * rpm / 60.0 * (1 + 1e-9)) + 1  # smooth: no burst


@settings(max_examples=150, deadline=None)
@given(
    st.floats(min_value=60.0, max_value=1e5),
    st.floats(min_value=1e3, max_value=1e7),
    requests,
    st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=60, max_size=60),
)
def test_a_server_gcra_admits_everything_the_client_schedules(
    rpm: float, tpm: float, reqs: list[tuple[float, int]], jitter: list[float]
) -> None:
    slots = _schedule(rpm, tpm, reqs)
    costs = [c for _, c in reqs]
    # Without network jitter the server can have zero tolerance.
    strict_r, strict_t = Gcra(rpm, tolerance=0.0), Gcra(tpm, tolerance=0.0)
    for slot, cost in zip(slots, costs, strict=True):
        assert strict_r.check(slot) == 0.0 and strict_t.check(slot) == 0.0
        strict_r.admit(slot, 1)
        strict_t.admit(slot, cost)
    # With arrival jitter up to J (arrivals may even reorder), tolerance J + one request's worth suffices.
    j = max(jitter)
    arrivals = sorted((slot + d, cost) for slot, cost, d in zip(slots, costs, jitter, strict=False))
    loose_r = Gcra(rpm, tolerance=j + 60.0 / rpm)
    loose_t = Gcra(tpm, tolerance=j + max(costs) * 60.0 / tpm)
    for at, cost in arrivals:
        assert loose_r.check(at) == 0.0 and loose_t.check(at) == 0.0
        loose_r.admit(at, 1)
        loose_t.admit(at, cost)


@settings(max_examples=150, deadline=None)
@given(
    st.floats(min_value=1.0, max_value=1e5),
    st.floats(min_value=0.0, max_value=5.0),
    st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=200),
)
def test_server_gcra_admits_at_most_rate_plus_burst(rpm: float, tolerance: float, gaps: list[float]) -> None:
    g = Gcra(rpm, tolerance=tolerance)
    now, admitted = 0.0, []
    for gap in gaps:
        now += gap
        wait = g.check(now)
        if wait == 0.0:
            g.admit(now, 1)
            admitted.append(now)
        else:
            assert g.check(now + wait + 1e-6) == 0.0  # the retry-after it gives is enough
    span = admitted[-1] - admitted[0] if admitted else 0.0
    assert len(admitted) <= span * rpm / 60.0 + tolerance * rpm / 60.0 + 1 + 1e-6


def test_server_gcra_burst_remaining_and_reset() -> None:
    g = Gcra(600, tolerance=0.5)  # one per 0.1 s, tolerance 0.5 s -> a burst of 6
    assert g.remaining(0.0) == 6
    admitted = 0
    while g.check(0.0) == 0.0:
        g.admit(0.0, 1)
        admitted += 1
    assert admitted == 6
    assert g.remaining(0.0) == 0
    assert g.check(0.0) == pytest.approx(0.1, abs=1e-6)
    assert g.reset_seconds(0.0) == pytest.approx(0.6)


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), True, "10"])
def test_bad_rates_fail_at_construction(bad: object) -> None:
    with pytest.raises(ConfigError, match="rpm"):
        RateLimiter(rpm=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tpm"):
        RateSchedule(tpm=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Gcra(bad)  # type: ignore[arg-type]


def test_pause_pushes_every_later_start() -> None:
    s = RateSchedule(rpm=60)
    assert s.reserve(0.0, 1)[0] == 0.0
    s.pause(0.2, 5.0)
    assert s.reserve(0.3, 1)[0] == pytest.approx(5.2)
    assert s.reserve(0.3, 1)[0] == pytest.approx(6.2)


@pytest.mark.anyio
async def test_headers_lower_the_limits_but_never_raise_them() -> None:
    lim = RateLimiter(rpm=1000)
    lim.observe(RateLimitInfo(requests_limit=500, tokens_limit=20_000))
    assert (lim.rpm, lim.tpm) == (500, 20_000)
    lim.observe(RateLimitInfo(requests_limit=5000))
    assert lim.rpm == 1000  # the user's ceiling holds
    lim.set_limits(rpm=None, tpm=None)
    assert (lim.rpm, lim.tpm) == (None, None)
    lim.observe(RateLimitInfo(requests_limit=120, requests_remaining=0))
    assert lim.rpm == 120
    assert lim._schedule.paused_until > anyio.current_time()  # an empty bucket pauses new starts


@pytest.mark.anyio
async def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    lim = RateLimiter(rpm=1)  # one start a minute: the second caller must wait
    await lim.acquire(1)
    booked = lim._schedule._next_request
    with anyio.move_on_after(0.05):
        await lim.acquire(1)
    assert lim._schedule._next_request == booked  # the cancelled booking was undone


@pytest.mark.anyio
async def test_unlimited_acquire_does_not_yield() -> None:
    lim = RateLimiter()
    ran = False

    async def other() -> None:
        nonlocal ran
        ran = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        for _ in range(100):
            await lim.acquire(10)
        assert not ran  # the fast path never gave the loop away
