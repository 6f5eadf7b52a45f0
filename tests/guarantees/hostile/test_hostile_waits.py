"""Hostile servers cannot stall a run: every wait a server can ask for is bounded.

- a 429 whose Retry-After is past `max_retry_after` fails that request and pauses nobody past the cap;
- rate-limit headers cannot cut the limiter's rates below its floor (`RateLimiter.MIN_RPM`/`MIN_TPM`)
  nor pause it past its cap (`max_pause`);
- a request that would wait for the limiter longer than its timeout fails at once with `Timeout`.
"""

from __future__ import annotations

import time

import anyio
import pytest
from _loopback import Hostile, honest_usage, hostile, openai_answer
from aiohttp import web
from evomerge_openai import OpenAIProvider

from evomerge_sdk import ChatRequest, RateLimited
from evomerge_sdk import RequestTimeout as SDKTimeout
from evomerge_sdk.scheduler import RateLimiter, RetryPolicy, Scheduler

pytestmark = pytest.mark.anyio

MODEL = "gpt-4o-mini"


def question(i: int) -> ChatRequest:
    return ChatRequest(model=MODEL, messages=f"question {i}: what is {i} plus {i}?", max_tokens=8)


async def test_a_huge_retry_after_fails_that_call_and_the_run_goes_on() -> None:
    async def handler(request: web.Request, server: Hostile) -> web.StreamResponse:
        body = server.bodies[-1]
        if server.requests == 1:
            error = {"error": {"message": "slow down", "type": "requests", "code": None}}
            return web.json_response(error, status=429, headers={"Retry-After": "100000"})
        return web.json_response(openai_answer(body, honest_usage(body, server)))

    retry = RetryPolicy(max_retry_after=1.0, base_delay=0.01)
    async with (
        hostile(handler) as server,
        OpenAIProvider(base_url=server.url, api_key="sk-test-waits") as provider,
        Scheduler(retry=retry, timeout=5.0, cache=False) as scheduler,
    ):
        with pytest.raises(RateLimited):
            await scheduler.complete(provider, question(0))
        started = time.monotonic()
        with anyio.fail_after(10):
            answers = [await scheduler.complete(provider, question(i)) for i in range(1, 4)]
        waited = time.monotonic() - started
    assert [a.text for a in answers] == ["Paris"] * 3
    assert waited <= retry.max_retry_after + 1.0  # paused at most up to the cap, never 27.8 hours


@pytest.mark.parametrize(
    "headers",
    [
        {f"x-ratelimit-{k}-tokens": v for k, v in (("limit", "1"), ("remaining", "0"), ("reset", "9h"))},
        {f"x-ratelimit-{k}-requests": v for k, v in (("limit", "1"), ("remaining", "0"), ("reset", "9h"))},
    ],
    ids=["limit-tokens-1", "remaining-requests-0"],
)
async def test_rate_limit_headers_cannot_stall_the_limiter(headers: dict[str, str]) -> None:
    async def handler(request: web.Request, server: Hostile) -> web.StreamResponse:
        body = server.bodies[-1]
        return web.json_response(openai_answer(body, honest_usage(body, server)), headers=headers)

    async with (
        hostile(handler) as server,
        OpenAIProvider(base_url=server.url, api_key="sk-test-waits") as provider,
        Scheduler(timeout=3.0, cache=False, retry=RetryPolicy(max_attempts=1)) as scheduler,
    ):
        outcomes: list[str] = []
        with anyio.fail_after(20):  # a stalled limiter would hang here for hours
            for i in range(4):
                started = time.monotonic()
                try:
                    await scheduler.complete(provider, question(i))
                    outcomes.append("ok")
                except SDKTimeout:
                    outcomes.append("timeout")
                # A call either succeeds or fails within its timeout: it never hangs past it.
                assert time.monotonic() - started < 3.0 + 1.0
        limiter = scheduler.limiter(MODEL)
    assert outcomes[0] == "ok"
    assert limiter.rpm is None or limiter.rpm >= RateLimiter.MIN_RPM
    assert limiter.tpm is None or limiter.tpm >= RateLimiter.MIN_TPM


async def test_limiter_pauses_are_capped() -> None:
    limiter = RateLimiter(max_pause=2.0)
    limiter.pause(100_000.0)
    started = anyio.current_time()
    with anyio.fail_after(5):
        await limiter.acquire(1)
    assert anyio.current_time() - started <= 2.0 + 0.5


async def test_a_wait_longer_than_the_timeout_fails_at_once_with_timeout() -> None:
    limiter = RateLimiter(rpm=1.0)  # one start a minute
    await limiter.acquire(1)
    started = time.monotonic()
    with pytest.raises(SDKTimeout, match="rate limit"):
        await limiter.acquire(1, max_wait=30.0)  # the next start is about 60 s away
    assert time.monotonic() - started < 10.0  # failed at once, without sleeping out the 30 s
    # the refused booking was given back: the next caller is not pushed further out by it
    with pytest.raises(SDKTimeout):
        await limiter.acquire(1, max_wait=30.0)


async def test_scheduler_timeout_bounds_the_limiter_wait() -> None:
    async def handler(request: web.Request, server: Hostile) -> web.StreamResponse:
        body = server.bodies[-1]
        return web.json_response(openai_answer(body, honest_usage(body, server)))

    async with (
        hostile(handler) as server,
        OpenAIProvider(base_url=server.url, api_key="sk-test-waits") as provider,
        Scheduler(rpm=1.0, timeout=0.5, cache=False, retry=RetryPolicy(max_attempts=1)) as scheduler,
    ):
        await scheduler.complete(provider, question(0))
        started = time.monotonic()
        with pytest.raises(SDKTimeout):
            await scheduler.complete(provider, question(1))
        assert time.monotonic() - started < 1.0
        assert scheduler.spent().reserved_tokens == 0
    assert server.requests == 1
