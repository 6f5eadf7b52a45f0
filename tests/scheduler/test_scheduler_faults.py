"""Retries under injected faults: 429 + Retry-After, 5xx, hangs, drops, malformed JSON; determinism."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from structlog.testing import capture_logs

from evomerge_sdk import (
    BadResponse,
    BudgetExceeded,
    ChatRequest,
    ConfigError,
    ConnectionFailed,
    RateLimited,
    RequestTimeout,
    ServerError,
)
from evomerge_sdk.http import parse_duration
from evomerge_sdk.local.faults import FaultConfig, format_duration
from evomerge_sdk.scheduler import Budget, RetryPolicy, Scheduler
from evomerge_sdk.testing import EchoProvider, EchoServer

MODEL = "gpt-4o-mini"
FAST = RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.01)


def req(i: int | str, max_tokens: int = 16) -> ChatRequest:
    return ChatRequest(model=MODEL, messages=f"question {i}", max_tokens=max_tokens)


@asynccontextmanager
async def echo(faults: FaultConfig) -> AsyncIterator[tuple[EchoServer, EchoProvider]]:
    async with EchoServer(faults=faults) as server:
        # Load the tokenizer's encoding now: on a first request it would eat the 0.3 s timeouts below.
        await server.tokens.acount_request(req(0))
        provider = server.provider()
        try:
            yield server, provider
        finally:
            await provider.aclose()


@pytest.mark.parametrize(
    "fault, error",
    [
        ({"rate_limit_rate": 1.0}, RateLimited),
        ({"error_rate": 1.0}, ServerError),
        ({"drop_rate": 1.0}, ConnectionFailed),
        ({"malformed_rate": 1.0}, BadResponse),
        ({"hang_rate": 1.0, "hang_seconds": 30.0}, RequestTimeout),
    ],
)
@pytest.mark.anyio
async def test_each_fault_is_retried_until_it_passes(fault: dict[str, float], error: type[Exception]) -> None:
    faults = FaultConfig(seed=1, max_faults_per_request=2, retry_after=0.02, **fault)
    async with echo(faults) as (server, provider):
        with capture_logs() as logs:
            async with Scheduler(retry=FAST, timeout=0.3) as s:
                c = await s.complete(provider, req(1))
        assert c.text == "echo: question 1"
        retries = [e for e in logs if e["event"] == "request_retry"]
        assert len(retries) == 2 and all(e["error"].startswith(error.__name__) for e in retries)
        if error is RateLimited:
            assert [e["delay_s"] for e in retries] == [0.02, 0.02]  # Retry-After honoured as given
        assert s.metrics().retries == 2
        assert server.stats.requests == 3 and sum(server.stats.injected.values()) == 2


@pytest.mark.anyio
async def test_a_retry_after_beyond_the_maximum_fails_instead_of_stalling() -> None:
    faults = FaultConfig(rate_limit_rate=1.0, retry_after=120.0)
    async with echo(faults) as (server, provider), Scheduler(retry=RetryPolicy(max_retry_after=5.0)) as s:
        with pytest.raises(RateLimited) as info:
            await s.complete(provider, req(1))
        assert info.value.retry_after == 120.0
        assert server.stats.requests == 1
        assert s.spent().reserved_tokens == 0


@pytest.mark.anyio
async def test_the_last_error_surfaces_after_max_attempts() -> None:
    faults = FaultConfig(error_rate=1.0, max_faults_per_request=None)
    async with echo(faults) as (server, provider), Scheduler(retry=FAST) as s:
        with pytest.raises(ServerError):
            await s.complete(provider, req(1))
        assert server.stats.requests == FAST.max_attempts
        m = s.metrics()
        assert (m.failed, m.retries, m.requests) == (1, FAST.max_attempts - 1, FAST.max_attempts)


def test_fault_rates_are_validated() -> None:
    with pytest.raises(ConfigError, match="error_rate"):
        FaultConfig(error_rate=1.5)
    with pytest.raises(ConfigError, match="sum"):
        FaultConfig(error_rate=0.6, drop_rate=0.6)
    with pytest.raises(ConfigError, match="latency"):
        FaultConfig(latency=-1.0)


def test_fault_decisions_depend_on_request_not_arrival_order() -> None:
    faults = FaultConfig(seed=7, error_rate=0.3, drop_rate=0.2)
    first = [faults.decide(bytes([i]), 0) for i in range(200)]
    assert first == [faults.decide(bytes([i]), 0) for i in range(200)]
    assert first != [
        FaultConfig(seed=8, error_rate=0.3, drop_rate=0.2).decide(bytes([i]), 0) for i in range(200)
    ]
    share = sum(k is not None for k in first) / 200
    assert 0.35 < share < 0.65


def test_durations_round_trip_in_openai_format() -> None:
    for seconds in (0.017, 0.5, 1.5, 59.0, 360.0):
        parsed = parse_duration(format_duration(seconds))
        assert parsed is not None and parsed == pytest.approx(seconds, abs=0.001)
    assert parse_duration("6m0s") == 360.0
    assert parse_duration("1h2m3s") == 3723.0
    assert parse_duration("soon") is None


MIXED = FaultConfig(
    seed=11,
    rate_limit_rate=0.1,
    retry_after=0.01,
    error_rate=0.1,
    drop_rate=0.05,
    malformed_rate=0.05,
    hang_rate=0.03,
    hang_seconds=30.0,
    slow_rate=0.05,
    slow_seconds=0.05,
    max_faults_per_request=2,
)


async def _run(faults: FaultConfig, n: int) -> tuple[list[str], dict[str, int]]:
    async with (
        echo(faults) as (server, provider),
        Scheduler(max_concurrency=16, retry=FAST, timeout=0.5) as s,
    ):
        texts: list[str] = [""] * n

        async def one(i: int) -> None:
            texts[i] = (await s.complete(provider, req(i, max_tokens=6))).text

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        return texts, dict(server.stats.injected)


@pytest.mark.anyio
async def test_same_results_with_and_without_faults() -> None:
    clean, none = await _run(FaultConfig(), 60)
    faulty, injected = await _run(MIXED, 60)
    again, injected_again = await _run(MIXED, 60)
    assert none == {}
    assert sum(injected.values()) > 10
    assert faulty == clean == again
    assert injected == injected_again  # the same faults hit the same requests, whatever the timing


@pytest.mark.anyio
async def test_budget_holds_under_faults_that_hide_the_outcome() -> None:
    budget = 4_000
    faults = FaultConfig(seed=5, drop_rate=0.2, malformed_rate=0.2, hang_rate=0.05, error_rate=0.1)
    async with (
        echo(faults) as (server, provider),
        Scheduler(max_concurrency=64, budget=Budget(tokens=budget), retry=FAST, timeout=0.3) as s,
    ):
        done = {"ok": 0, "refused": 0, "failed": 0}

        async def caller(i: int) -> None:
            try:
                await s.complete(provider, req(i, max_tokens=24))
                done["ok"] += 1
            except BudgetExceeded:
                done["refused"] += 1
            except (ConnectionFailed, BadResponse, RequestTimeout, ServerError):
                done["failed"] += 1

        with anyio.fail_after(60):  # a hang guard
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(caller, i)
        assert sum(done.values()) == 200 and done["refused"] > 0
        # Dropped and malformed answers were served (and billed) but never seen: charged in full.
        assert server.stats.served_tokens <= s.spent().tokens <= budget
        assert s.spent().unknown_tokens > 0 and s.spent().reserved_tokens == 0


@pytest.mark.anyio
async def test_provider_maps_a_refused_connection_to_a_retryable_error() -> None:
    async with EchoServer() as server:
        url = server.url
    provider = EchoProvider(url)  # the server is gone: nothing listens there any more
    try:
        async with Scheduler(retry=RetryPolicy(max_attempts=2, base_delay=0.001)) as s:
            with pytest.raises(ConnectionFailed):
                await s.complete(provider, req(1))
            assert s.metrics().retries == 1
    finally:
        await provider.aclose()
