"""The hard budget under pressure: 500 concurrent callers, faults that hide outcomes, a search whose budget
runs out mid-generation. The service never serves more tokens than the budget, nothing hangs, and the
search stops cleanly with its best result saved and its spend reported."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from _resume_driver import POPSIZE, SEARCH, run_search
from evomerge_openai import OpenAIProvider

from evomerge_sdk.engine import EvoMerge, StopReason
from evomerge_sdk.errors import BudgetExceeded
from evomerge_sdk.local import preset_id
from evomerge_sdk.local.faults import FaultConfig
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.objectives import ServiceObjective
from evomerge_sdk.providers import ChatRequest
from evomerge_sdk.scheduler import Budget, RetryPolicy, Scheduler
from evomerge_sdk.service import MergeServiceClient

CALLERS = 500
TOKENS_PER_EVALUATION = 720
NOTHING_HANGS = 60.0  # seconds; generous for a noisy machine, the runs take a few seconds


@pytest.mark.anyio
@pytest.mark.parametrize(
    "faults",
    [None, FaultConfig(seed=4, error_rate=0.1, rate_limit_rate=0.05, retry_after=0.01, drop_rate=0.1)],
    ids=["healthy", "faulty"],
)
async def test_500_concurrent_callers_never_get_more_served_than_the_budget(
    repo: Repository, faults: FaultConfig | None
) -> None:
    prompts = repo.target("ood:ner/news").test.prompts
    outcomes: list[str] = []
    async with LocalService(repo, pool_sizes=(5,), faults=faults) as service:
        limit = 4000
        scheduler = Scheduler(
            max_concurrency=CALLERS,
            budget=Budget(tokens=limit),
            cache=False,
            retry=RetryPolicy(max_attempts=6, base_delay=0.001, max_delay=0.01),
        )
        provider = OpenAIProvider(base_url=f"{service.url}/v1", api_key="sk-budget-test")

        async def caller(i: int) -> None:
            request = ChatRequest(model="base", messages=f"{prompts[i % len(prompts)]} {i}", max_tokens=1)
            try:
                await scheduler.complete(provider, request)
                outcomes.append("ok")
            except BudgetExceeded:
                outcomes.append("budget")

        with anyio.fail_after(NOTHING_HANGS):
            async with scheduler, provider, anyio.create_task_group() as tg:
                for i in range(CALLERS):
                    tg.start_soon(caller, i)
        spent = scheduler.spent()
        served = service.stats.served_tokens
    assert len(outcomes) == CALLERS  # every caller finished: served, or refused with BudgetExceeded
    assert 0 < outcomes.count("ok") < CALLERS and outcomes.count("budget") > 0
    assert served <= limit  # the service's own count: the hard cap held
    # The client's count covers the service's: dropped answers are charged at their worst case.
    assert served <= spent.tokens <= limit and spent.reserved_tokens == 0


@pytest.mark.anyio
async def test_a_search_whose_budget_runs_out_mid_generation_stops_cleanly(
    repo: Repository, tmp_path: Path
) -> None:
    limit = (7 * POPSIZE + POPSIZE // 2) * TOKENS_PER_EVALUATION  # 7.5 generations
    checkpoint, cache = tmp_path / "checkpoint.json", tmp_path / "cache.sqlite"
    async with LocalService(repo, pool_sizes=(5,)) as service:
        with anyio.fail_after(NOTHING_HANGS):
            stopped = await run_search(
                service.url, checkpoint=checkpoint, cache=cache, budget=Budget(tokens=limit)
            )
        served_when_stopped = service.stats.served_tokens
        saved = json.loads(checkpoint.read_text())
        # Resumed with room to finish, from the checkpoint and the cache: it ends as an unlimited run.
        with anyio.fail_after(NOTHING_HANGS):
            resumed = await run_search(service.url, checkpoint=checkpoint, cache=cache)
        paid_in_total = service.stats.served_requests
    async with LocalService(repo, pool_sizes=(5,)) as fresh:
        whole = await run_search(fresh.url, cache=False)
        paid_whole = fresh.stats.served_requests

    result = stopped.result
    assert result.stop_reason is StopReason.BUDGET_EXCEEDED
    assert result.evaluations == 7 * POPSIZE  # complete generations only
    assert served_when_stopped <= limit and stopped.spent.tokens <= limit
    assert stopped.spent.tokens == served_when_stopped  # the spend reported is what was served
    assert stopped.metrics.budget_rejections > 0
    # The best so far is saved: the checkpoint's incumbent is the result, and it resumes.
    assert saved["finished"] is False
    assert saved["state"]["incumbent"]["candidate"] == result.candidate.to_dict()
    assert resumed.result.to_dict() == whole.result.to_dict()
    assert paid_in_total == paid_whole  # the partial generation's evaluations were cached, not paid twice


@pytest.mark.anyio
async def test_a_budget_too_small_for_one_evaluation_fails_at_once(repo: Repository) -> None:
    async with (
        LocalService(repo, pool_sizes=(5,)) as service,
        Scheduler(budget=Budget(tokens=TOKENS_PER_EVALUATION - 1)) as scheduler,
        MergeServiceClient(service.url, scheduler=scheduler, tokens_per_example=12) as client,
    ):
        session = await client.create_session(preset_id("ood:ner/news", 5))
        with (
            anyio.fail_after(NOTHING_HANGS),
            pytest.raises(BudgetExceeded, match=r"pays for it\): nothing was sent") as exc,
        ):
            await EvoMerge(ServiceObjective(client, session), 5, SEARCH).run()
        assert exc.value.spent is not None and exc.value.spent.tokens == 0
        assert service.stats.served_requests == 0
