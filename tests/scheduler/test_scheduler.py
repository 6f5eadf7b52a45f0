"""The scheduler against a real loopback OpenAI-compatible server: limits, budget, cache, logs, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from structlog.testing import capture_logs

from evomerge_sdk import (
    AuthenticationError,
    BudgetExceeded,
    ChatRequest,
    ConfigError,
    InvalidRequest,
    Usage,
    UsageError,
)
from evomerge_sdk.local.faults import FaultConfig, ServerLimits
from evomerge_sdk.scheduler import Budget, Outcome, Price, RetryPolicy, Scheduler, cache_key
from evomerge_sdk.testing import EchoProvider, EchoServer

MODEL = "gpt-4o-mini"


def req(i: int | str, max_tokens: int = 32, **kw: Any) -> ChatRequest:
    # 32: the whole echo fits even when counts are the byte estimate (no tiktoken files)
    return ChatRequest(model=MODEL, messages=f"question {i}", max_tokens=max_tokens, **kw)


@asynccontextmanager
async def echo(**server_kw: Any) -> AsyncIterator[tuple[EchoServer, EchoProvider]]:
    provider_kw = server_kw.pop("provider", {})
    async with EchoServer(**server_kw) as server:
        provider = server.provider(**provider_kw)
        try:
            yield server, provider
        finally:
            await provider.aclose()


def _files_contain(folder: Path, needle: bytes) -> bool:
    return any(needle in f.read_bytes() for f in folder.iterdir())


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": 2.5}, "max_concurrency"),
        ({"rpm": -1}, "rpm"),
        ({"tpm": 0}, "tpm"),
        ({"timeout": 0}, "timeout"),
        ({"budget": 100}, "Budget"),
        ({"retry": 3}, "RetryPolicy"),
        ({"models": "gpt-4o"}, "list of model names"),
        ({"tokens": "cl100k_base"}, "TokenCounter"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Scheduler(**kwargs)


def test_bad_retry_policies_fail_at_construction() -> None:
    with pytest.raises(ConfigError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigError, match="base_delay"):
        RetryPolicy(base_delay=-0.1)


@pytest.mark.anyio
async def test_calls_need_an_open_scheduler() -> None:
    s = Scheduler()
    async with echo() as (_, provider):
        with pytest.raises(UsageError, match="async with"):
            await s.complete(provider, req(1))


@pytest.mark.anyio
async def test_completions_usage_and_honest_token_counts() -> None:
    async with echo() as (server, provider), Scheduler() as s:
        c = await s.complete(provider, req("alpha", logprobs=True, top_logprobs=3))
        assert c.text == "echo: question alpha"
        assert c.finish_reason == "stop"
        assert c.logprobs is not None and len(c.logprobs) == c.usage.output_tokens
        assert all(len(t.top) == 3 for t in c.logprobs)
        # The prompt tokens the client reserved are exactly the ones the server counted and served.
        assert c.usage.input_tokens == s.tokens.count_request(req("alpha"))
        assert server.stats.served_tokens == c.usage.total_tokens
        cut = await s.complete(provider, ChatRequest(model=MODEL, messages="a b c d e f g h", max_tokens=3))
        assert cut.usage.output_tokens == 3 and cut.finish_reason == "length"
        m = s.metrics()
        assert (m.succeeded, m.tokens_in, m.tokens_out) == (
            2,
            c.usage.input_tokens + cut.usage.input_tokens,
            c.usage.output_tokens + 3,
        )
        assert m.latency_p50 is not None and m.latency_p95 is not None


@pytest.mark.anyio
async def test_cache_hits_and_in_flight_deduplication() -> None:
    async with echo(faults=FaultConfig(latency=0.05)) as (server, provider), Scheduler() as s:
        results = []

        async def one() -> None:
            results.append(await s.complete(provider, req("same")))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
        assert server.stats.served_requests == 1  # 19 identical calls waited for the first
        again = await s.complete(provider, req("same"))
        assert server.stats.served_requests == 1
        fresh = await s.complete(provider, req("same"), cache=False)
        assert server.stats.served_requests == 2
        assert {r.text for r in results} == {again.text, fresh.text}
        m = s.metrics()
        assert (m.dedup_hits, m.cache_hits, m.requests) == (19, 1, 2)


@pytest.mark.anyio
async def test_generic_call_shares_budget_cache_and_metrics() -> None:
    calls = 0

    async def evaluate() -> tuple[dict[str, float], Usage]:
        nonlocal calls
        calls += 1
        return {"loss": 0.25}, Usage(input_tokens=300, output_tokens=0)

    async with Scheduler(budget=Budget(tokens=1000)) as s:
        key = cache_key("evaluate", "session-1", "[0.5,0.5]")
        r1 = await s.call(evaluate, model="local-service", reserve=Usage(300, 0), cache_key=key)
        r2 = await s.call(evaluate, model="local-service", reserve=Usage(300, 0), cache_key=key)
        assert (r1.value, r1.cached, r1.attempts) == ({"loss": 0.25}, False, 1)
        assert (r2.value, r2.cached, calls) == ({"loss": 0.25}, True, 1)
        await s.call(evaluate, model="local-service", reserve=Usage(300, 0))
        await s.call(evaluate, model="local-service", reserve=Usage(300, 0))
        with pytest.raises(BudgetExceeded) as info:
            await s.call(evaluate, model="local-service", reserve=Usage(300, 0))
        assert info.value.spent.tokens == 900
        with pytest.raises(ConfigError, match="reserve"):
            await s.call(evaluate, model="local-service", reserve=Usage(-1, 0))

        async def wrong() -> Any:
            return {"loss": 1.0}

        with pytest.raises(ConfigError, match="Outcome"):
            await s.call(wrong, model="m", reserve=Usage(1, 0))
        assert s.spent().reserved_tokens == 0  # the bad return still settled its reservation
        rich = await s.call(lambda: _outcome({"ok": True}), model="m", reserve=Usage(1, 1), label="probe")
        assert rich.value == {"ok": True}
    assert s.metrics().cache_hits == 1


async def _outcome(value: Any) -> Outcome:
    return Outcome(value, Usage(1, 1))


@pytest.mark.anyio
async def test_the_concurrency_limit_holds_and_is_first_come_first_served() -> None:
    running, peak, order = 0, 0, []

    async def work(i: int) -> tuple[int, Usage]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        order.append(i)
        await anyio.sleep(0.01)
        running -= 1
        return i, Usage(1, 1)

    async with Scheduler(max_concurrency=3) as s:
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(partial(s.call, partial(work, i), model="m", reserve=Usage(1, 1)))
                await anyio.lowlevel.checkpoint()  # start them in order
        assert peak == 3
        assert order == list(range(30))
        assert s._slots.value == 3


@pytest.mark.anyio
async def test_budget_holds_with_hundreds_of_concurrent_callers() -> None:
    budget = 6_000
    async with echo() as (server, provider), Scheduler(max_concurrency=64, budget=Budget(tokens=budget)) as s:
        outcomes: list[str] = []

        async def caller(i: int) -> None:
            try:
                await s.complete(provider, req(i, max_tokens=24))
                outcomes.append("ok")
            except BudgetExceeded as exc:
                assert exc.spent.tokens <= budget
                outcomes.append("refused")

        with anyio.fail_after(60):  # a hang guard
            async with anyio.create_task_group() as tg:
                for i in range(500):
                    tg.start_soon(caller, i)
        assert len(outcomes) == 500 and "refused" in outcomes and "ok" in outcomes
        assert server.stats.served_tokens <= budget
        spend = s.spent()
        assert spend.reserved_tokens == 0
        assert spend.tokens == server.stats.served_tokens  # no faults: spend is exactly what was served


@pytest.mark.anyio
async def test_usd_budget_with_user_prices() -> None:
    price = Price(input=1_000.0, output=2_000.0)  # USD per 1M tokens: 0.001 / 0.002 per token
    async with (
        echo() as (server, provider),
        Scheduler(budget=Budget(usd=0.5), models=[MODEL], prices={MODEL: price}) as s,
    ):
        refused = 0
        async with anyio.create_task_group() as tg:

            async def caller(i: int) -> None:
                nonlocal refused
                try:
                    await s.complete(provider, req(i, max_tokens=20))
                except BudgetExceeded:
                    refused += 1

            for i in range(100):
                tg.start_soon(caller, i)
        served_usd = (server.stats.served_input_tokens * 0.001) + (server.stats.served_output_tokens * 0.002)
        assert served_usd <= 0.5 + 1e-12
        assert refused > 0
        assert s.spent().usd == pytest.approx(served_usd)
        assert s.metrics().cost_usd == pytest.approx(served_usd)
        with pytest.raises(ConfigError, match="not among the models"):
            await s.complete(provider, ChatRequest(model="gpt-4o", messages="x"))


@pytest.mark.anyio
async def test_client_limiter_keeps_the_server_free_of_429s() -> None:
    limits = ServerLimits(rpm=3000, tpm=200_000, burst_seconds=0.25)
    async with echo(limits=limits) as (server, provider), Scheduler(rpm=3000, tpm=200_000) as s:
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(s.complete, provider, req(i))
        assert server.stats.total_429s == 0
        assert server.stats.served_requests == 40


@pytest.mark.anyio
async def test_server_limits_are_learned_from_headers_and_429s_retried() -> None:
    limits = ServerLimits(rpm=1200, burst_seconds=0.0)
    async with echo(limits=limits) as (server, provider), Scheduler() as s:
        assert s.limiter().rpm is None
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(s.complete, provider, req(i))
        assert s.limiter().rpm == 1200  # adopted from x-ratelimit-limit-requests
        m = s.metrics()
        assert m.succeeded == 12
        assert m.rate_limited == server.stats.total_429s > 0  # the burst was refused, then retried


@pytest.mark.anyio
async def test_limits_per_model_keep_separate_limiters() -> None:
    async with Scheduler(rpm=600, limits_per_model=True) as s:
        assert s.limiter("a") is not s.limiter("b")
        assert s.limiter("a") is s.limiter("a")
        s.set_rate_limits(rpm=300, tpm=None)
        assert s.limiter("a").rpm == 300 and s.limiter("c").rpm == 300


@pytest.mark.anyio
async def test_auth_and_invalid_requests_are_never_retried() -> None:
    async with echo(api_key="sk-right-key-000000") as (server, _), Scheduler() as s:
        wrong = EchoProvider(server.url, api_key="sk-wrong-key-999999")
        with pytest.raises(AuthenticationError):
            await s.complete(wrong, req(1))
        await wrong.aclose()
        right = server.provider()
        with pytest.raises(InvalidRequest):
            await s.complete(right, ChatRequest(model=MODEL, messages="x", extra={"seed": "not a number"}))
        await right.aclose()
        assert server.stats.requests == 2
        assert s.metrics().retries == 0 and s.spent().reserved_tokens == 0 and s.spent().tokens == 0


@pytest.mark.anyio
async def test_secrets_and_prompts_stay_out_of_logs_errors_and_cache(tmp_path: Path) -> None:
    key = "sk-test-SUPERSECRET-1234567890"
    prompt = "the confidential prompt text"
    faults = FaultConfig(seed=3, error_rate=0.5, max_faults_per_request=1)
    async with echo(api_key=key, faults=faults) as (server, provider):
        wrong = EchoProvider(server.url, api_key=key + "x")
        with capture_logs() as logs:
            async with Scheduler(cache=tmp_path / "c.sqlite", retry=RetryPolicy(base_delay=0.001)) as s:
                for i in range(6):
                    await s.complete(provider, ChatRequest(model=MODEL, messages=f"{prompt} {i}"))
                with pytest.raises(AuthenticationError) as info:
                    await s.complete(wrong, ChatRequest(model=MODEL, messages=prompt))
        await wrong.aclose()
        text = repr(logs) + str(info.value) + repr(info.value) + repr(provider) + repr(wrong)
        assert key not in text and "SUPERSECRET" not in text
        assert prompt not in repr(logs)
        assert any(e["event"] == "request_retry" for e in logs)
        assert not _files_contain(tmp_path, b"SUPERSECRET")
        with capture_logs() as debug_logs:
            async with Scheduler(log_prompts=True) as s:
                await s.complete(provider, ChatRequest(model=MODEL, messages=prompt))
        assert prompt in repr(debug_logs)  # only when asked for


@pytest.mark.anyio
async def test_cancelling_callers_releases_everything() -> None:
    baseline = len(asyncio.all_tasks())
    faults = FaultConfig(latency=30.0)  # every answer takes far longer than the test
    async with echo(faults=faults, provider={"force_close": True}) as (server, provider):
        async with Scheduler(max_concurrency=8, budget=Budget(tokens=100_000)) as s:
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(s.complete, provider, req(i))
                with anyio.fail_after(10):  # cancelled once every slot's request is at the server
                    while server.stats.requests < s.max_concurrency:  # noqa: ASYNC110 - a counter
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
            spend = s.spent()
            assert spend.reserved_tokens == 0  # nothing left reserved...
            assert spend.unknown_tokens > 0  # ...the 8 sent were charged (the API may bill them)
            assert s.metrics().in_flight == 0
            assert s._inflight == {}
            assert s._slots.value == s.max_concurrency
            # The cancelled calls leave nothing behind: the next call goes through at once.
            server.injector.faults = FaultConfig()
            assert (await s.complete(provider, req("after"))).text == "echo: question after"
        with anyio.fail_after(10):  # a hang guard: the server sees every cancelled connection close
            while server.open_connections:  # noqa: ASYNC110 - no event exists for a peer's close
                await anyio.sleep(0.01)
    assert len(asyncio.all_tasks()) == baseline


@pytest.mark.anyio
async def test_a_cancelled_leader_hands_over_to_a_waiting_duplicate() -> None:
    # The leader's request sits at the server (a latency no test outlives) until it is cancelled; the
    # order of events is waited for, never slept for, so a busy machine cannot reorder it.
    async with echo(faults=FaultConfig(latency=600)) as (server, provider), Scheduler() as s:
        got: list[str] = []

        async def follower() -> None:
            got.append((await s.complete(provider, req("dup"))).text)

        async with anyio.create_task_group() as tg:
            leader = anyio.CancelScope()

            async def lead() -> None:
                with leader:
                    await s.complete(provider, req("dup"))

            tg.start_soon(lead)
            with anyio.fail_after(10):
                while server.stats.requests < 1:  # noqa: ASYNC110 - the server counts, it signals nothing
                    await anyio.sleep(0.005)
            server.injector.faults = FaultConfig()  # a request sent from now on is answered at once
            tg.start_soon(follower)
            await anyio.wait_all_tasks_blocked()  # the follower waits for the leader's flight
            assert not got
            leader.cancel()
        assert got == ["echo: question dup"]
        assert server.stats.served_requests == 1  # the leader's request was abandoned, not served
        assert s.metrics().dedup_hits == 0 and s.spent().reserved_tokens == 0


@pytest.mark.anyio
async def test_a_request_the_sdk_refuses_before_sending_costs_nothing() -> None:
    # A closed provider raises UsageError (a ConfigError before 0.2): nothing was billed, so the
    # reservation is released rather than charged.
    async def closed() -> Outcome:
        raise UsageError("the echo provider is closed")

    async with Scheduler(budget=Budget(tokens=1_000)) as s:
        with pytest.raises(UsageError, match="closed"):
            await s.call(closed, model="local-service", reserve=Usage(300, 0))
        spent = s.spent()
        assert spent.input_tokens == spent.output_tokens == spent.unknown_tokens == 0
