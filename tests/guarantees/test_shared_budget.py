"""Many workers, one key (README: "Several workers, one API key"): 4 worker processes x 200 callers share
one hard budget and one RPM limit through the real Redis, against a loopback server that speaks the
OpenAI chat-completions wire format and counts what it serves. A worker SIGKILLed mid-flight cannot make
the budget leak; Redis restarted mid-run fails the run with a typed error and stops a search with its
resumable checkpoint."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_sync
from _resume_driver import POPSIZE, PRESET, SEARCH, run_search
from evomerge_openai import OpenAIProvider
from redis_servers import START_COMMAND, PrivateRedis, go, start_fleet, stop_fleet, wait_until

from evomerge_sdk.engine import Candidate, EvaluationContext, EvoMerge, StopReason
from evomerge_sdk.errors import CoordinationLost
from evomerge_sdk.local.faults import FaultConfig, ServerLimits
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.objectives import ServiceObjective
from evomerge_sdk.providers import ChatRequest
from evomerge_sdk.scheduler import Budget, RedisCoordination, Scheduler, Spend
from evomerge_sdk.service import MergeServiceClient
from evomerge_sdk.testing import EchoServer

pytestmark = pytest.mark.anyio

WORKERS, CALLERS = 4, 200
NOTHING_HANGS = 120.0  # seconds; the runs take a few, on a noisy 2-core machine


async def shared_spend(url: str, namespace: str) -> tuple[Spend, int]:
    """The namespace's spend (expired leases charged on the way) and how many leases expired."""
    async with RedisCoordination(url, namespace=namespace) as coordination:
        spent = await coordination.spent()
    client = redis_sync.Redis.from_url(url)
    expired = int(client.hget(f"evomerge:{{{namespace}}}:budget", "expired") or 0)
    client.close()
    return spent, expired


def fleet_args(server: EchoServer, url: str, namespace: str, *extra: str) -> list[str]:
    return ["--url", server.url, "--redis", url, "--namespace", namespace, "--callers", str(CALLERS), *extra]


async def test_four_workers_never_get_more_served_than_one_shared_budget(
    redis_url: str, namespace: str
) -> None:
    limit = 30_000
    async with EchoServer() as server:
        workers = await start_fleet(
            WORKERS, *fleet_args(server, redis_url, namespace, "--budget", str(limit))
        )
        try:
            with anyio.fail_after(NOTHING_HANGS):
                await go(workers)
                results = [await w.result() for w in workers]
        finally:
            await stop_fleet(workers)
        served = server.stats.served_tokens
    spent, expired = await shared_spend(redis_url, namespace)
    for r in results:  # every caller ended the same clean way: the budget refused its next request
        assert r["seen"].get("budget") == CALLERS and set(r["seen"]) <= {"ok", "budget"}, r
    # The processes really shared it (on a loaded machine one may get its first answers late).
    assert sum(r["seen"].get("ok", 0) > 0 for r in results) >= 2, results
    assert served <= limit  # the server's own count: the shared cap held across processes
    assert served > 0.9 * limit  # and the budget was used, not wasted on idle reservations
    assert spent.tokens == served and spent.reserved_tokens == 0 and expired == 0


async def test_a_worker_killed_mid_flight_cannot_leak_the_budget(redis_url: str, namespace: str) -> None:
    limit = 40_000
    lease = 1.5
    # Every answer takes 50 ms, so each worker always has requests (and reservations) in flight.
    async with EchoServer(faults=FaultConfig(latency=0.05)) as server:
        workers = await start_fleet(
            WORKERS, *fleet_args(server, redis_url, namespace, "--budget", str(limit), "--lease", str(lease))
        )
        try:
            with anyio.fail_after(NOTHING_HANGS):
                await go(workers)
                await wait_until(lambda: server.stats.served_requests >= 300)
                workers[0].proc.send_signal(signal.SIGKILL)
                assert await workers[0].proc.wait() == -signal.SIGKILL
                survivors = [await w.result() for w in workers[1:]]
        finally:
            await stop_fleet(workers)
        served = server.stats.served_tokens
        await anyio.sleep(lease + 0.5)  # any lease the dead worker held has run out by now
        spent, expired = await shared_spend(redis_url, namespace)
    for r in survivors:  # the others finished: every caller served, then refused by the budget
        assert r["seen"].get("budget") == CALLERS and r["seen"].get("ok", 0) > 0, r
    assert expired > 0  # the dead worker's reservations expired and were charged in full ...
    assert spent.unknown_tokens > 0 and spent.reserved_tokens == 0
    assert served <= spent.tokens <= limit  # ... so the budget stayed hard: nothing served past it


async def test_four_workers_keep_one_rpm_limit_without_429s(redis_url: str, namespace: str) -> None:
    rpm = 12_000.0  # 200 requests per second, enforced by the server with 429s: 800 requests in 4 s
    async with EchoServer(limits=ServerLimits(rpm=rpm, burst_seconds=1.0)) as server:
        workers = await start_fleet(
            WORKERS, *fleet_args(server, redis_url, namespace, "--rpm", str(rpm), "--requests", "1")
        )
        try:
            with anyio.fail_after(NOTHING_HANGS):
                await go(workers)
                results = [await w.result() for w in workers]
        finally:
            await stop_fleet(workers)
        stats = server.stats
    assert stats.total_429s == 0 and all(r["rate_limited"] == 0 for r in results)
    assert all(r["seen"].get("ok", 0) > 0 and set(r["seen"]) == {"ok"} for r in results), results
    assert stats.first_admitted is not None and stats.last_admitted is not None
    span = stats.last_admitted - stats.first_admitted
    utilization = (stats.served_requests - 1) / span * 60.0 / rpm
    assert utilization >= 0.95, (utilization, stats.served_requests, span)


async def test_redis_restarted_mid_run_fails_every_caller_with_a_typed_error(
    private_redis: PrivateRedis,
) -> None:
    callers = 50
    lost: list[CoordinationLost] = []
    served_when_lost: list[int] = []
    async with EchoServer(faults=FaultConfig(latency=0.02)) as server:
        shared = RedisCoordination(private_redis.url, namespace="restart", lease=1.5, timeout=0.5)
        scheduler = Scheduler(
            max_concurrency=callers, budget=Budget(tokens=10**8), shared=shared, cache=False
        )
        provider = OpenAIProvider(base_url=f"{server.url}/v1", api_key="sk-restart-test")

        async def caller(i: int) -> None:
            k = 0
            while True:
                k += 1
                request = ChatRequest(model="gpt-4o-mini", messages=f"caller {i} request {k}", max_tokens=8)
                try:
                    await scheduler.complete(provider, request)
                except CoordinationLost as exc:  # any other error fails the test
                    served_when_lost.append(server.stats.served_requests)
                    lost.append(exc)
                    return

        with anyio.fail_after(NOTHING_HANGS):
            async with scheduler, provider:
                async with anyio.create_task_group() as tg:
                    for i in range(callers):
                        tg.start_soon(caller, i)
                    await wait_until(lambda: server.stats.served_requests >= 200)
                    private_redis.kill()
                    private_redis.start()  # empty: no persistence, so the shared budget is gone
                # A caller that comes later is refused at once, without sending anything.
                served = server.stats.served_requests
                with pytest.raises(CoordinationLost, match="lost the Redis coordinator"):
                    late = ChatRequest(model="gpt-4o-mini", messages="late", max_tokens=8)
                    await scheduler.complete(provider, late)
        assert server.stats.served_requests == served
    assert len(lost) == callers  # every caller ended with the typed error, none hung, none crashed
    assert all(private_redis.url in str(exc) for exc in lost)
    # Only requests already in flight when Redis went away were answered afterwards.
    assert served - min(served_when_lost) <= callers


class _KillRedisAt:
    """An objective that kills the coordinator's Redis before generation `at`, then scores as usual."""

    def __init__(self, inner: ServiceObjective, at: int, server: PrivateRedis) -> None:
        self.inner, self.at, self.server, self.calls = inner, at, server, 0

    async def __call__(self, candidates: list[Candidate], context: EvaluationContext) -> list[float]:
        self.calls += 1
        if self.calls == self.at:
            self.server.kill()
        return await self.inner(candidates, context)


async def _shared_search(url: str, redis: PrivateRedis, checkpoint: Path, kill_at: int | None) -> Any:
    shared = RedisCoordination(redis.url, namespace="search", lease=1.5, timeout=0.5)
    scheduler = Scheduler(max_concurrency=POPSIZE, shared=shared)
    async with scheduler, MergeServiceClient(url, scheduler=scheduler) as client:
        session = await client.create_session(PRESET)
        objective: Any = ServiceObjective(client, session)
        if kill_at is not None:
            objective = _KillRedisAt(objective, kill_at, redis)
        return await EvoMerge(objective, session.adapter_count, SEARCH, checkpoint=checkpoint).run()


async def test_a_search_stops_resumably_when_the_coordinator_is_lost(
    repo: Repository, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "checkpoint.json"
    async with LocalService(repo, pool_sizes=(5,)) as service:
        with anyio.fail_after(NOTHING_HANGS):
            stopped = await _shared_search(service.url, private_redis, checkpoint, kill_at=4)
        saved = json.loads(checkpoint.read_text())
        private_redis.start()
        with anyio.fail_after(NOTHING_HANGS):
            resumed = await _shared_search(service.url, private_redis, checkpoint, kill_at=None)
    async with LocalService(repo, pool_sizes=(5,)) as fresh:
        whole = await run_search(fresh.url, cache=False)
    assert stopped.stop_reason is StopReason.COORDINATION_LOST
    assert stopped.evaluations == 3 * POPSIZE  # the three whole generations before Redis went away
    assert saved["finished"] is False
    assert saved["state"]["incumbent"]["candidate"] == stopped.candidate.to_dict()
    assert resumed.to_dict() == whole.result.to_dict()  # resumed from the checkpoint: the same result


def test_these_tests_run_in_ci() -> None:
    """`.ci/run` starts Redis when it is not running, with the command the README documents."""
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "if ! redis-cli ping" in ci and START_COMMAND in ci
