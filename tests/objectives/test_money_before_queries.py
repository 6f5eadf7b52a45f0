"""Money before queries, and the SDK's own errors: a budget that cannot pay for one search generation or
one scoring pass fails before any request, saying how much is needed; a scoring pass that runs out
keeps what it paid for; a failing merged model or scoring pass raises the SDK's error, never an
ExceptionGroup; misuse is one clear error. Against the embedded service (a real loopback server that
counts what it served)."""

from __future__ import annotations

import re
import socket
from typing import Any

import pytest

from evomerge_sdk import DEFAULT, Budget, EvoMerge, MergeServiceClient, Scheduler, ServiceObjective
from evomerge_sdk.errors import BudgetExceeded, ConnectionFailed, ProviderError, UsageError
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.merged import MergedModel, MergedSpec
from evomerge_sdk.objectives import (
    AnswerSet,
    LabelledExamples,
    ScoringConfig,
    ScoringProgress,
    collect_scores,
)
from evomerge_sdk.providers import Usage, load_provider
from evomerge_sdk.scheduler import Outcome, ResponseCache, RetryPolicy

LOGPROBS = ScoringConfig(method="logprobs", top_logprobs=20)


def _examples(repo: Repository, n: int) -> tuple[list[str], LabelledExamples]:
    target = repo.targets()[0]
    tokens = repo.tokenizer.tokens
    options = AnswerSet(tuple(tokens[int(i)] for i in target.validation.answer_ids))
    answers = [tokens[int(i)] for i in target.validation.labels[:n]]
    pool = list(repo.pool(target, 4, 0))
    return [*pool, "base"], LabelledExamples.of(list(target.validation.prompts[:n]), answers, options)


def _needed(message: str) -> int:
    found = re.search(r"at least ([\d,]+) tokens", message)
    assert found, message
    return int(found.group(1).replace(",", ""))


@pytest.mark.anyio
async def test_a_search_budget_too_small_for_one_generation_fails_before_any_request(
    repo: Repository, service: LocalService
) -> None:
    async with (
        Scheduler(budget=Budget(tokens=5_000)) as scheduler,
        MergeServiceClient(service.url, scheduler=scheduler) as client,
    ):
        preset = next(p for p in await client.presets() if p.preset_id.endswith("/pool-4"))
        target = preset.preset_id.split("/pool-")[0]
        validation = await client.create_session(
            preset.preset_id, query_plus={"dataset": f"{target}:validation"}
        )
        served = service.stats.served_requests
        with pytest.raises(BudgetExceeded) as refused:
            await EvoMerge(ServiceObjective(client, validation), preset.adapter_count, DEFAULT).run()
    message = str(refused.value)
    assert "one generation" in message and "nothing was sent" in message
    assert _needed(message) > 5_000
    assert service.stats.served_requests == served  # not one evaluation was sent


@pytest.mark.anyio
async def test_a_scoring_pass_the_budget_cannot_pay_for_fails_first_and_says_how_much(
    repo: Repository, service: LocalService
) -> None:
    models, examples = _examples(repo, 20)
    provider = load_provider("openai", base_url=f"{service.url}/v1")
    try:
        async with Scheduler(budget=Budget(tokens=1_000)) as scheduler:
            with pytest.raises(BudgetExceeded) as refused:
                await collect_scores(scheduler, provider, models, examples, LOGPROBS)
            assert scheduler.spent().tokens == 0
        needed = _needed(str(refused.value))
        assert service.stats.served_requests == 0
        # The amount named is enough: with it, the same pass is paid in full.
        seen: list[ScoringProgress] = []
        async with Scheduler(budget=Budget(tokens=needed)) as scheduler:
            table = await collect_scores(
                scheduler, provider, models, examples, LOGPROBS, on_progress=seen.append
            )
        assert table.scores.shape[:2] == (len(models), 20)
        assert [p.done for p in seen] == list(range(1, len(models) * 20 + 1))
        assert seen[-1].total == len(models) * 20
        assert seen[-1].tokens == table.usage.input_tokens + table.usage.output_tokens
    finally:
        await provider.aclose()


@pytest.mark.anyio
async def test_a_scoring_pass_that_runs_out_keeps_what_it_paid_for(
    repo: Repository, service: LocalService
) -> None:
    # 300 prompts: more than one batch of requests started at once, so some are not yet reserved when the
    # budget is spent elsewhere.
    models, examples = _examples(repo, 60)
    total = len(models) * 60
    provider = load_provider("openai", base_url=f"{service.url}/v1")
    cache = ResponseCache()
    try:
        async with Scheduler(budget=Budget(tokens=60_000), cache=cache, max_concurrency=2) as scheduler:

            async def other_user(progress: ScoringProgress) -> None:
                # After the plan was checked, another user of the scheduler spends nearly all of it.
                if progress.done == 256:  # the first batch of requests is settled
                    left = 60_000 - scheduler.spent().tokens - scheduler.spent().reserved_tokens - 20

                    async def spend() -> Outcome:
                        return Outcome("spent elsewhere", Usage(left, 0))

                    await scheduler.call(spend, model="elsewhere", reserve=Usage(left, 0))

            with pytest.raises(BudgetExceeded) as ran_out:
                await collect_scores(scheduler, provider, models, examples, LOGPROBS, on_progress=other_user)
        message = str(ran_out.value)
        paid = int(re.search(r"after ([\d,]+) of", message).group(1))  # type: ignore[union-attr]
        assert 256 <= paid < total and "cache" in message and "pays only for the rest" in message
        served = service.stats.served_requests
        async with Scheduler(cache=cache) as scheduler:
            await collect_scores(scheduler, provider, models, examples, LOGPROBS)
        assert service.stats.served_requests - served == total - paid  # the paid answers were kept
    finally:
        await provider.aclose()


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _spec(repo: Repository) -> MergedSpec:
    target = repo.targets()[0]
    return MergedSpec(
        mode="output",
        pool=repo.pool(target, 4, 0),
        alpha=(1.0, 1.0, 1.0, 1.0),
        beta=(0.5, 0.4, -0.3, 0.2),
        reference="base",
        answer_set=tuple(repo.tokenizer.tokens[int(i)] for i in target.test.answer_ids),
    )


@pytest.mark.anyio
async def test_a_failing_merged_model_raises_the_sdks_error_not_a_group(repo: Repository) -> None:
    provider = load_provider("openai", base_url=_dead_url())
    try:
        async with (
            Scheduler(retry=RetryPolicy(max_attempts=1)) as scheduler,
            MergedModel(_spec(repo), provider=provider, scheduler=scheduler) as merged,
        ):
            with pytest.raises(ProviderError) as failed:
                await merged.complete(repo.targets()[0].test.prompts[0])
    finally:
        await provider.aclose()
    assert isinstance(failed.value, ConnectionFailed)
    others: Any = getattr(failed.value, "others", ())
    assert len(others) == 4  # five models asked, the first failure raised, the others attached


@pytest.mark.anyio
async def test_a_merged_model_used_unopened_is_one_clear_error(
    repo: Repository, service: LocalService
) -> None:
    provider = load_provider("openai", base_url=f"{service.url}/v1")
    try:
        merged = MergedModel(_spec(repo), provider=provider)
        with pytest.raises(UsageError, match="async with"):
            await merged.complete("ner: a ?")
    finally:
        await provider.aclose()
