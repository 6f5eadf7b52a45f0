"""A search spread over several replicas of a merge service (DESIGN 7), one of them killed mid-run.

Each replica is the embedded service in its own process (tests/_replica_driver.py), all built from the
same seed, so an evaluation's loss does not depend on which replica scored it: the search's result must
be exactly the one-replica result, whatever replica died and whichever evaluations it took with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import numpy as np
import pytest

from evomerge_sdk import EvoMerge, MergeServiceClient, SearchConfig, ServiceObjective, StageConfig
from evomerge_sdk.engine import Candidate, EvaluationContext
from evomerge_sdk.errors import ConfigError, InvalidRequest
from evomerge_sdk.local import LocalService, preset_id
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.scheduler import RetryPolicy, Scheduler

DRIVER = Path(__file__).resolve().parent / "_replica_driver.py"
PRESET = preset_id("ood:ner/news", 5)
SEARCH = SearchConfig(
    name="replicas",
    denoise=StageConfig(start=1.0, sigma=0.2, lower=0.0, upper=1.0, max_evaluations=4 * 12, popsize=12),
    scale=StageConfig(start="1/N", sigma=0.1, lower=-1.5, upper=1.5, max_evaluations=8 * 12, popsize=12),
    early_stopping=None,
    seed=3,
)
FAST_RETRY = RetryPolicy(max_attempts=6, base_delay=0.001, max_delay=0.02, seed=1)
TOKENS_PER_EXAMPLE = 12  # the small embedded world's examples are 12 tokens


def _start(latency: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, str(DRIVER), "--latency", str(latency)], stdout=subprocess.PIPE, env=env
    )


@asynccontextmanager
async def replicas(count: int, latency: float) -> AsyncIterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """`count` replica processes, each serving the small embedded world; killed at the end."""
    procs = [_start(latency) for _ in range(count)]
    try:
        urls = []
        for proc in procs:
            assert proc.stdout is not None
            with anyio.fail_after(120):
                line = await anyio.to_thread.run_sync(proc.stdout.readline)
            urls.append(json.loads(line)["url"])
        yield list(zip(urls, procs, strict=True))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()


class KillDuring:
    """The objective, except that `proc` is SIGKILLed 10 ms into generation `at` (evaluations in flight)."""

    def __init__(self, inner: ServiceObjective, proc: subprocess.Popen[bytes] | None, at: int = 4) -> None:
        self.inner, self.proc, self.at, self.calls = inner, proc, at, 0

    async def __call__(self, candidates: Sequence[Candidate], context: EvaluationContext) -> list[float]:
        self.calls += 1
        if self.proc is None or self.calls != self.at:
            return await self.inner(candidates, context)
        proc = self.proc

        async def kill_soon() -> None:
            await anyio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_soon)
            losses = await self.inner(candidates, context)
        return losses


async def search(urls: list[str], kill: subprocess.Popen[bytes] | None = None) -> tuple:  # type: ignore[type-arg]
    """The search over `urls`; `kill` is SIGKILLed in the middle of its fourth generation."""
    async with (
        Scheduler(retry=FAST_RETRY, cache=False) as scheduler,
        MergeServiceClient(urls, scheduler=scheduler, tokens_per_example=TOKENS_PER_EXAMPLE) as client,
    ):
        session = await client.create_session(PRESET)
        objective = KillDuring(ServiceObjective(client, session), kill)
        result = await EvoMerge(objective, session.adapter_count, SEARCH).run()
        replicas_seen = [(r.url, r.live, r.evaluations, r.most_in_flight) for r in client.replicas]
        return result, scheduler.metrics(), replicas_seen


@pytest.mark.anyio
async def test_a_replica_killed_mid_search_changes_nothing() -> None:
    async with replicas(3, latency=0.02) as running:
        urls = [url for url, _ in running]
        alone, _, _ = await search(urls[:1])
        spread, metrics, seen = await search(urls, kill=running[1][1])
    assert spread.to_dict() == alone.to_dict()  # the same merge, loss and history, evaluation for evaluation
    assert metrics.retries >= 1  # the killed replica's evaluations in flight were sent again elsewhere
    killed = seen[1]
    assert not killed[1] and killed[2] >= 1  # it worked until it died, and was then left alone
    assert all(live and done > killed[2] for _, live, done, _ in (seen[0], seen[2]))
    assert all(peak >= 2 for *_, peak in seen)  # concurrency-safe replicas take several at once


@pytest.mark.anyio
async def test_evaluations_go_to_the_least_busy_replica(repo: Repository) -> None:
    async with (
        LocalService(repo, pool_sizes=(5,)) as a,
        LocalService(repo, pool_sizes=(5,)) as b,
        MergeServiceClient([a.url, b.url], tokens_per_example=TOKENS_PER_EXAMPLE) as client,
    ):
        session = await client.create_session(PRESET)
        assert len(session.replica_ids) == 2 and a.open_sessions == b.open_sessions == 1
        rng = np.random.default_rng(0)
        vectors = [(rng.random(5), rng.normal(0, 0.3, 5)) for _ in range(40)]
        async with anyio.create_task_group() as tg:
            for alpha, beta in vectors:
                tg.start_soon(client.evaluate, session, alpha, beta)
        done = [r.evaluations for r in client.replicas]
        assert sum(done) == 40 and min(done) >= 10  # spread, not piled on the first URL
        one = await client.evaluate(session, *vectors[0])
        assert one.cached  # the cache key is the session's content, not a replica's session id
    assert a.open_sessions == b.open_sessions == 0  # closed: deleted on every replica


@pytest.mark.anyio
async def test_a_session_one_replica_refuses_is_deleted_where_others_opened_it(repo: Repository) -> None:
    async with (
        LocalService(repo, pool_sizes=(5,)) as a,
        LocalService(repo, pool_sizes=(4,)) as b,  # no preset of 5 adapters: 404
        MergeServiceClient([a.url, b.url], tokens_per_example=TOKENS_PER_EXAMPLE) as client,
    ):
        with pytest.raises(InvalidRequest):
            await client.create_session(PRESET)
        assert a.open_sessions == 0  # not left to count against a's session cap


@pytest.mark.anyio
async def test_replica_lists_are_checked() -> None:
    with pytest.raises(ConfigError, match="base_url"):
        MergeServiceClient([])
    with pytest.raises(ConfigError, match="twice"):
        MergeServiceClient(["http://127.0.0.1:1", "http://127.0.0.1:1/"])
    with pytest.raises(ConfigError, match="base_url"):
        MergeServiceClient(["http://127.0.0.1:1", "localhost:2"])
