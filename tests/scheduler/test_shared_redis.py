"""`RedisCoordination` against the real Redis: what several schedulers on one namespace share (each
scheduler stands for a worker here; the multi-process runs are in tests/guarantees/test_shared_budget.py),
the cache's TTL, cap and cross-worker de-duplication, and the errors at the boundary."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest
import redis as redis_sync
from evomerge_openai import OpenAIProvider
from redis_servers import PrivateRedis, free_port

from evomerge_sdk.errors import (
    BudgetExceeded,
    ConfigError,
    CoordinationLost,
    InvalidRequest,
    RateLimited,
    RequestTimeout,
)
from evomerge_sdk.providers import ChatRequest, RateLimitInfo, Usage
from evomerge_sdk.scheduler import Budget, Outcome, RedisCoordination, RetryPolicy, Scheduler
from evomerge_sdk.testing import EchoServer

pytestmark = pytest.mark.anyio

NO_RETRY = RetryPolicy(max_attempts=1)


@asynccontextmanager
async def workers(
    url: str, namespace: str, n: int = 2, shared: dict[str, Any] | None = None, **scheduler: Any
) -> AsyncIterator[list[Scheduler]]:
    """`n` open schedulers, each with its own RedisCoordination (its own connection and identity)."""
    async with AsyncExitStack() as stack:
        out = []
        for _ in range(n):
            coordination = RedisCoordination(url, namespace=namespace, **(shared or {}))
            s = Scheduler(shared=coordination, retry=scheduler.pop("retry", NO_RETRY), **scheduler)
            out.append(await stack.enter_async_context(s))
        yield out


def answer(value: Any, tokens: int = 1, rate_limits: RateLimitInfo | None = None) -> Any:
    """A billable call that returns `value` having used `tokens` input tokens (at most its reservation)."""

    async def fn() -> Outcome:
        return Outcome(value, Usage(tokens, 0), rate_limits)

    return fn


def keys_of(url: str, namespace: str) -> dict[bytes, bytes]:
    """Every key of the namespace, with a dump of its value (for the no-secrets check)."""
    client = redis_sync.Redis.from_url(url)
    try:
        return {k: client.dump(k) or b"" for k in client.scan_iter(match=f"evomerge:{{{namespace}}}:*")}
    finally:
        client.close()


# -- the boundary ------------------------------------------------------------------------------------------


async def test_an_unreachable_redis_is_a_config_error_naming_the_url_without_its_password() -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    scheduler = Scheduler(shared=RedisCoordination(url, namespace="nowhere", timeout=0.5, lease=2.0))
    with pytest.raises(ConfigError, match=r"cannot use Redis at redis://:\*\*\*@127\.0\.0\.1:\d+/0") as exc:
        async with scheduler:
            pass
    assert "hunter2" not in str(exc.value) and "hunter2" not in repr(scheduler._shared)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "http://127.0.0.1:6379", "namespace": "a"}, "redis://"),
        ({"namespace": "team a"}, "namespace must be"),
        ({"namespace": ""}, "namespace must be"),
        ({"namespace": "a", "lease": 1.0, "timeout": 1.0}, "at least 3 x timeout"),
        ({"namespace": "a", "rate_floor": 2.0}, "rate_floor"),
        ({"namespace": "a", "cache_max_entries": 0}, "cache_max_entries"),
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RedisCoordination(**kwargs)


async def test_a_worker_with_another_budget_is_refused_and_one_without_adopts_it(
    redis_url: str, namespace: str
) -> None:
    async with workers(redis_url, namespace, n=1, budget=Budget(tokens=100)):
        other = Scheduler(shared=RedisCoordination(redis_url, namespace=namespace), budget=Budget(tokens=200))
        with pytest.raises(ConfigError, match=r"already holds the budget Budget\(tokens=100\)"):
            async with other:
                pass
        async with workers(redis_url, namespace, n=1) as (
            plain,
        ):  # declares no budget: held to the stored one
            for i in range(10):
                await plain.call(answer(i, 10), model="m", reserve=Usage(10, 0))
            with pytest.raises(BudgetExceeded, match="shared budget exhausted: 100 of 100 tokens"):
                await plain.call(answer(10, 10), model="m", reserve=Usage(10, 0))


# -- the budget --------------------------------------------------------------------------------------------


async def test_workers_share_one_budget_and_see_each_others_spend(redis_url: str, namespace: str) -> None:
    async with workers(redis_url, namespace, n=2, budget=Budget(tokens=100), cache=False) as (a, b):
        for i in range(5):
            await a.call(answer(i, 10), model="m", reserve=Usage(10, 0))
            await b.call(answer(i, 10), model="m", reserve=Usage(10, 0))
        with pytest.raises(BudgetExceeded):
            await a.call(answer("one more", 10), model="m", reserve=Usage(10, 0))
        with pytest.raises(BudgetExceeded):
            await b.call(answer("one more", 10), model="m", reserve=Usage(10, 0))
        await b._shared.spent()  # type: ignore[union-attr]
        assert b.spent().tokens == 100 and b.spent().requests == 10


async def test_a_caller_waits_for_room_another_worker_holds(redis_url: str, namespace: str) -> None:
    gate, holding = anyio.Event(), anyio.Event()

    async def slow() -> Outcome:
        holding.set()  # called once its 80 tokens are reserved
        await gate.wait()
        return Outcome("slow", Usage(5, 0))  # reserved 80, used 5: room comes back when it settles

    async with workers(redis_url, namespace, n=2, budget=Budget(tokens=100), cache=False) as (a, b):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: a.call(slow, model="m", reserve=Usage(80, 0)))
            with anyio.fail_after(5):
                await holding.wait()
            waiting = anyio.Event()

            async def second() -> None:
                await b.call(answer("fast", 50), model="m", reserve=Usage(50, 0))
                waiting.set()

            tg.start_soon(second)
            await anyio.sleep(0.2)
            assert not waiting.is_set()  # 80 + 50 > 100: waits while a's request is in flight
            gate.set()
            with anyio.fail_after(5):
                await waiting.wait()
        spent = await b._shared.spent()  # type: ignore[union-attr]
        assert spent.tokens == 55 and spent.reserved_tokens == 0


# -- the limiter -------------------------------------------------------------------------------------------


async def test_one_workers_headers_lower_every_workers_limit_with_a_floor_and_an_expiry(
    redis_url: str, namespace: str
) -> None:
    shared = {"rate_floor": 0.25, "rate_ttl": 0.5}
    async with workers(redis_url, namespace, n=2, shared=shared, rpm=6000, cache=False) as (a, b):
        await a.call(
            answer("x", rate_limits=RateLimitInfo(requests_limit=3000)), model="m", reserve=Usage(1, 0)
        )
        await b.call(answer("y"), model="m", reserve=Usage(1, 0))
        assert b.limiter().rpm == 3000  # a's headers, adopted by b
        await a.call(answer("x", rate_limits=RateLimitInfo(requests_limit=1)), model="m", reserve=Usage(1, 0))
        await b.call(answer("y"), model="m", reserve=Usage(1, 0))
        assert b.limiter().rpm == 1500  # floored at rate_floor x the configured 6000, not 1
        await anyio.sleep(0.6)
        await b.call(answer("z"), model="m", reserve=Usage(1, 0))
        assert b.limiter().rpm == 6000  # the lowering expired: back to the configured limit


async def test_a_429_on_one_worker_pauses_every_worker(redis_url: str, namespace: str) -> None:
    async def refused() -> Outcome:
        raise RateLimited("slow down", retry_after=0.5)

    async with workers(redis_url, namespace, n=2, rpm=60_000, cache=False) as (a, b):
        t0 = time.perf_counter()  # the pause starts after this, when Redis hears of the 429
        with pytest.raises(RateLimited):
            await a.call(refused, model="m", reserve=Usage(1, 0))
        await a._shared._link.drain()  # type: ignore[union-attr]  # the pause has reached Redis
        await b.call(answer("after the pause"), model="m", reserve=Usage(1, 0))
        # Measured from before the 429, so however slow the machine the 0.5 s pause is all inside it
        # (less a margin for Redis's clock against this process's).
        assert time.perf_counter() - t0 >= 0.45


async def test_a_shared_start_past_the_request_timeout_fails_at_once_without_booking(
    redis_url: str, namespace: str
) -> None:
    client = redis_sync.Redis.from_url(redis_url)
    rate = f"evomerge:{{{namespace}}}:rate:*"
    async with workers(redis_url, namespace, n=2, rpm=60, cache=False, timeout=0.5) as (a, b):
        await a.call(answer("first"), model="m", reserve=Usage(1, 0))  # the next slot is 1 s away
        booked = client.hget(rate, "req")
        assert booked is not None
        with pytest.raises(RequestTimeout, match="shared rate limit: the next start is"):
            await b.call(answer("second"), model="m", reserve=Usage(1, 0))
        assert client.hget(rate, "req") == booked  # refused before booking: no slot is wasted
    client.close()


# -- the cache ---------------------------------------------------------------------------------------------


async def test_a_result_one_worker_paid_for_is_a_hit_for_another(redis_url: str, namespace: str) -> None:
    paid: list[str] = []

    def fn(who: str) -> Any:
        async def call() -> Outcome:
            paid.append(who)
            return Outcome({"answer": 42}, Usage(7, 3))

        return call

    async with workers(redis_url, namespace, n=2) as (a, b):
        first = await a.call(fn("a"), model="m", reserve=Usage(7, 3), cache_key="k1")
        await a.flush()  # on Redis now
        second = await b.call(fn("b"), model="m", reserve=Usage(7, 3), cache_key="k1")
    assert paid == ["a"] and not first.cached and second.cached
    assert second.value == {"answer": 42} and second.usage == Usage(7, 3)


async def test_identical_calls_in_flight_on_two_workers_are_paid_once(redis_url: str, namespace: str) -> None:
    gate, computing = anyio.Event(), anyio.Event()
    paid: list[str] = []

    def fn(who: str) -> Any:
        async def call() -> Outcome:
            paid.append(who)
            computing.set()  # its worker holds the key's claim
            await gate.wait()
            return Outcome("shared answer", Usage(5, 0))

        return call

    results: dict[str, Any] = {}
    async with workers(redis_url, namespace, n=2) as (a, b):

        async def run(s: Scheduler, who: str) -> None:
            results[who] = await s.call(fn(who), model="m", reserve=Usage(5, 0), cache_key="same")

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, a, "a")
            with anyio.fail_after(5):
                await computing.wait()  # a has claimed the key and is computing it
            tg.start_soon(run, b, "b")
            await anyio.sleep(0.2)
            gate.set()
    assert paid == ["a"]  # b waited for a's answer instead of sending its own
    assert results["b"].value == "shared answer" and results["b"].cached


async def test_when_the_worker_computing_a_key_fails_another_computes_it(
    redis_url: str, namespace: str
) -> None:
    gate, computing = anyio.Event(), anyio.Event()

    async def failing() -> Outcome:
        computing.set()  # a holds the key's claim
        await gate.wait()
        raise InvalidRequest("no")

    results: list[Any] = []
    async with workers(redis_url, namespace, n=2) as (a, b):

        async def run_a() -> None:
            with pytest.raises(InvalidRequest):
                await a.call(failing, model="m", reserve=Usage(5, 0), cache_key="flaky")

        async def run_b() -> None:
            results.append(
                await b.call(answer("b computed", 5), model="m", reserve=Usage(5, 0), cache_key="flaky")
            )

        # b waits on a's claim; when a fails, b takes over at once (well within dedup_wait's 60 s).
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_a)
                await computing.wait()
                tg.start_soon(run_b)
                await anyio.sleep(0.1)
                assert not results  # still waiting for a
                gate.set()
    result = results[0]
    assert result.value == "b computed" and not result.cached


async def test_a_damaged_value_in_redis_is_a_miss_asked_again(redis_url: str, namespace: str) -> None:
    client = redis_sync.Redis.from_url(redis_url)
    client.set(f"evomerge:{{{namespace}}}:cache:v:bad", b'{"v": 1, "u": [-5, 0, 0]}')  # impossible usage
    client.close()
    async with workers(redis_url, namespace, n=1) as (a,):
        result = await a.call(answer("fresh"), model="m", reserve=Usage(1, 0), cache_key="bad")
        cache = a.cache
        assert cache is not None and getattr(cache, "damaged", 0) == 1
    assert result.value == "fresh" and not result.cached


async def test_the_cache_keeps_at_most_its_cap_oldest_out_first_and_forgets_after_its_ttl(
    redis_url: str, namespace: str
) -> None:
    shared = {"cache_max_entries": 3, "cache_ttl": 0.5}
    async with workers(redis_url, namespace, n=1, shared=shared) as (a,):
        for i in range(5):
            await a.call(answer(i), model="m", reserve=Usage(1, 0), cache_key=f"key{i}")
            await a.flush()
        stored = keys_of(redis_url, namespace)
        values = sorted(k.rsplit(b":", 1)[1] for k in stored if b":cache:v:" in k)
        assert values == [b"key2", b"key3", b"key4"]  # the cap is exact; the two oldest were evicted
        await anyio.sleep(0.6)
        assert not any(b":cache:v:" in k for k in keys_of(redis_url, namespace))  # the TTL ran out


async def test_a_scheduler_cancelled_on_its_way_out_still_disconnects(redis_url: str, namespace: str) -> None:
    # A timeout around the block cancels the scheduler's exit too; the coordination still sends what is
    # queued and stops its pumps and lease renewer, instead of leaving them running on the loop.
    import asyncio

    before = set(asyncio.all_tasks())
    with anyio.move_on_after(0.2) as scope:
        async with workers(redis_url, namespace, n=1, budget=Budget(tokens=100), cache=False) as (a,):
            await a.call(answer("paid", 5), model="m", reserve=Usage(10, 0))
            await anyio.sleep(30)
    assert scope.cancelled_caught
    left = [t.get_name() for t in set(asyncio.all_tasks()) - before if not t.done()]
    assert left == []
    async with workers(redis_url, namespace, n=1, budget=Budget(tokens=100), cache=False) as (b,):
        spent = await b._shared.spent()  # type: ignore[union-attr]
    assert spent.tokens == 5 and spent.reserved_tokens == 0  # the settlement was sent on the way out


async def test_a_cache_file_that_cannot_open_leaves_no_coordination_behind(
    redis_url: str, namespace: str, tmp_path: Any
) -> None:
    import asyncio

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = set(asyncio.all_tasks())
    scheduler = Scheduler(
        shared=RedisCoordination(redis_url, namespace=namespace), cache=blocker / "c.sqlite"
    )
    with pytest.raises(Exception, match="a-file"):
        async with scheduler:
            pass
    assert [t.get_name() for t in set(asyncio.all_tasks()) - before if not t.done()] == []


# -- security and failure ----------------------------------------------------------------------------------


async def test_no_key_or_value_in_redis_holds_the_api_key(redis_url: str, namespace: str) -> None:
    secret = "sk-shared-secret-4f3e2d1c0b9a8796"
    async with EchoServer(api_key=secret) as server:
        provider = OpenAIProvider(base_url=f"{server.url}/v1", api_key=secret)
        async with (
            provider,
            workers(redis_url, namespace, n=1, rpm=6000, budget=Budget(tokens=10_000)) as (a,),
        ):
            for i in range(3):
                await a.complete(provider, ChatRequest(model="gpt-4o-mini", messages=f"hi {i}", max_tokens=4))
            await a.flush()
    stored = keys_of(redis_url, namespace)
    assert any(b":cache:v:" in k for k in stored) and any(k.endswith(b":budget") for k in stored)
    blob = b"".join(k + v for k, v in stored.items())
    assert secret.encode() not in blob and b"4f3e2d1c0b9a8796" not in blob


async def test_redis_going_away_mid_run_is_a_typed_error_and_nothing_more_is_sent(
    private_redis: PrivateRedis,
) -> None:
    sent: list[int] = []

    async def call() -> Outcome:
        sent.append(1)
        return Outcome("ok", Usage(1, 0))

    coordination = RedisCoordination(private_redis.url, namespace="gone", timeout=0.5, lease=1.5)
    async with Scheduler(shared=coordination, budget=Budget(tokens=1000), cache=False, retry=NO_RETRY) as s:
        await s.call(call, model="m", reserve=Usage(1, 0))
        private_redis.kill()
        with pytest.raises(CoordinationLost, match=f"lost the Redis coordinator at {private_redis.url}"):
            await s.call(call, model="m", reserve=Usage(1, 0))
        with pytest.raises(CoordinationLost):  # it stays lost: no silent reconnection to an empty Redis
            private_redis.start()
            await s.call(call, model="m", reserve=Usage(1, 0))
    assert len(sent) == 1 and coordination.lost is not None


@pytest.mark.parametrize("forget", ["script_flush", "flushall"])
async def test_forgotten_scripts_are_reloaded_but_forgotten_data_fails_every_caller_at_once(
    private_redis: PrivateRedis, forget: str
) -> None:
    coordination = RedisCoordination(private_redis.url, namespace="forgot", timeout=0.5, lease=1.5)
    outcomes: list[str] = []
    async with Scheduler(
        shared=coordination, budget=Budget(tokens=10**6), cache=False, max_concurrency=50, retry=NO_RETRY
    ) as s:
        await s.call(answer("before"), model="m", reserve=Usage(1, 0))
        admin = redis_sync.Redis(port=private_redis.port)
        getattr(admin, forget)()  # an operator's SCRIPT FLUSH; or the data gone, as after a restart
        admin.close()

        async def one(i: int) -> None:
            try:
                await s.call(answer(i), model="m", reserve=Usage(1, 0))
                outcomes.append("sent")
            except CoordinationLost:
                outcomes.append("lost")

        # 50 reservations go out in one pipeline: each one's outcome is decided, none waits forever.
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
    # Scripts that did not run are loaded again and sent again; a budget that is gone is never recreated.
    assert outcomes == (["sent"] * 50 if forget == "script_flush" else ["lost"] * 50)
