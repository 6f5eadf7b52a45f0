"""Usage the budget can trust, whatever a chat API reports.

- no usage, `usage: null` or `usage: {}` (OpenAI and Anthropic adapters): an unknown outcome, charged its
  full reservation, so a 2,000-token budget cannot be served 5,200 tokens;
- usage beyond the reservation (completion tokens over `max_tokens`, prompt tokens over the counted
  prompt) or absurd (1e15, 2^63, a 321-digit integer): a `BadResponse` charged at the reservation, never
  cached; `spent()` and `metrics()` never raise, and the next call gets an answer or `BudgetExceeded`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from _loopback import Hostile, anthropic_answer, hostile, openai_answer
from aiohttp import web
from evomerge_anthropic import AnthropicProvider
from evomerge_openai import OpenAIProvider

from evomerge_sdk import BadResponse, BudgetExceeded, ChatRequest, Provider, Usage
from evomerge_sdk.scheduler import Budget, Outcome, RetryPolicy, Scheduler

pytestmark = pytest.mark.anyio

MAX_TOKENS = 16


def question(model: str, i: int) -> ChatRequest:
    return ChatRequest(model=model, messages=f"question {i}: what is {i} plus {i}?", max_tokens=MAX_TOKENS)


@asynccontextmanager
async def api(
    kind: str, usage: Callable[[dict[str, Any]], Any]
) -> AsyncIterator[tuple[Hostile, Provider, str]]:
    """A chat API of `kind` answering every request with `usage(body)` as its usage (... = no usage);
    it counts 200 served tokens per answer, whatever it reports."""

    async def handler(request: web.Request, server: Hostile) -> web.StreamResponse:
        body = server.bodies[-1]
        server.served_tokens += 200
        build = openai_answer if kind == "openai" else anthropic_answer
        return web.json_response(build(body, usage(body), text="word " * 184))

    async with hostile(handler) as server:
        if kind == "openai":
            provider: Any = OpenAIProvider(base_url=server.url, api_key="sk-usage-test")
            model = "gpt-4o-mini"
        else:
            provider = AnthropicProvider(base_url=server.url, api_key="sk-ant-usage-test")
            model = "claude-3-5-haiku"
        async with provider:
            yield server, provider, model


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("usage", [..., None, {}], ids=["absent", "null", "empty"])
async def test_unreported_usage_is_charged_the_reservation(kind: str, usage: Any) -> None:
    budget = 2_000
    async with (
        api(kind, lambda body: usage) as (server, provider, model),
        Scheduler(budget=Budget(tokens=budget), cache=False) as scheduler,
    ):
        answered = charged = 0
        with pytest.raises(BudgetExceeded):
            for i in range(100):
                completion = await scheduler.complete(provider, question(model, i))
                answered += 1
                # Each answer is charged its own worst case (prompts differ in length offline).
                charged += completion.usage.total_tokens
                assert completion.usage.output_tokens == MAX_TOKENS  # charged at its worst case
        spent = scheduler.spent()
        metrics = scheduler.metrics()
    assert answered >= 1
    assert spent.tokens <= budget and spent.unknown_tokens == spent.tokens == charged
    assert metrics.failed == 1  # the budget refusal; the answers themselves were served
    assert server.requests == answered  # nothing sent past the budget


def absurd(body: dict[str, Any], kind: str, prompt: int, completion: int) -> dict[str, Any]:
    if kind == "openai":
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return {"input_tokens": prompt, "output_tokens": completion}


HUGE = int("1" + "0" * 320)  # 1e320 as a JSON integer: no float can hold it


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("prompt", "completion"),
    [(10, 10**15), (10, MAX_TOKENS + 1), (10**6, 1), (HUGE, 1), (10, 2**63)],
    ids=["1e15", "over-max-tokens", "over-counted-prompt", "1e320", "2^63"],
)
async def test_impossible_usage_is_a_bad_response_charged_at_the_reservation(
    kind: str, prompt: int, completion: int, tmp_path: Path
) -> None:
    async with (
        api(kind, lambda body: absurd(body, kind, prompt, completion)) as (_, provider, model),
        Scheduler(
            budget=Budget(tokens=1_000),
            cache=tmp_path / "cache.sqlite",
            retry=RetryPolicy(max_attempts=1),
        ) as scheduler,
    ):
        with pytest.raises(BadResponse, match="usage"):
            await scheduler.complete(provider, question(model, 0))
        spent, metrics = scheduler.spent(), scheduler.metrics()  # never an OverflowError
        assert 0 < spent.tokens == spent.unknown_tokens <= 1_000
        assert metrics.tokens_in == metrics.tokens_out == 0 and metrics.failed == 1
        assert len(scheduler.cache or ()) == 0  # never cached
        await scheduler.flush()
        assert scheduler.cache is not None and scheduler.cache.write_errors == 0
        # the run goes on: the next call is answered or refused by the budget, nothing else
        with pytest.raises((BadResponse, BudgetExceeded)):
            await scheduler.complete(provider, question(model, 1))
        assert scheduler.spent().tokens <= 1_000


@pytest.mark.parametrize(
    "usage",
    [Usage("5", 0), Usage(None, 0), Usage(5, 0, None)],  # type: ignore[arg-type]
    ids=["text", "null", "null-cached"],
)
async def test_a_call_reporting_counts_that_are_not_numbers_is_a_bad_response(usage: Usage) -> None:
    # Counts a call function read from a JSON answer without checking: refused like any impossible
    # usage (not a TypeError from pricing it), and charged at the reservation.
    async def call() -> Outcome:
        return Outcome("answer", usage)

    async with Scheduler(budget=Budget(tokens=100), retry=RetryPolicy(max_attempts=1)) as scheduler:
        with pytest.raises(BadResponse, match="non-negative integers"):
            await scheduler.call(call, model="m", reserve=Usage(10, 0))
        spent = scheduler.spent()
        assert spent.tokens == spent.unknown_tokens == 10 and spent.reserved_tokens == 0
