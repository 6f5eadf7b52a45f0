"""The Anthropic adapter under the scheduler: 429 and 529 are retried, a spend-limit 429 is not."""

from __future__ import annotations

import pytest
from evomerge_anthropic import AnthropicProvider
from wire_servers import AnthropicWireServer, Failure, serve

from evomerge_sdk import ChatRequest, InvalidRequest
from evomerge_sdk.scheduler import RetryPolicy, Scheduler

pytestmark = pytest.mark.anyio

QUESTION = ChatRequest(model="claude-sonnet-4-5", messages="What is the capital of France?", max_tokens=16)


async def test_scheduler_retries_overloaded_and_rate_limited_answers() -> None:
    async with (
        serve(AnthropicWireServer()) as server,
        AnthropicProvider(base_url=server.base_url, api_key=server.api_key) as provider,
        Scheduler(retry=RetryPolicy(seed=5, base_delay=0.01), cache=False) as scheduler,
    ):
        server.push(
            Failure(529, "overloaded_error", "Overloaded"),
            Failure(
                429,
                "rate_limit_error",
                "Number of requests has exceeded your rate limit",
                headers={"retry-after-ms": "20"},
            ),
        )
        completion = await scheduler.complete(provider, QUESTION)
        metrics = scheduler.metrics()

    assert completion.text == server.sent[0].content[0].text
    assert len(server.received) == 3
    assert (metrics.requests, metrics.retries, metrics.rate_limited, metrics.succeeded) == (3, 2, 1, 1)
    assert metrics.tokens_in == completion.usage.input_tokens


async def test_scheduler_does_not_retry_a_spend_limit() -> None:
    spend_limit = Failure(
        429, "rate_limit_error", "You have reached your spend limit", code="enforced_spend_limit_reached"
    )
    async with (
        serve(AnthropicWireServer()) as server,
        AnthropicProvider(base_url=server.base_url, api_key=server.api_key) as provider,
        Scheduler(retry=RetryPolicy(seed=5, base_delay=0.01), cache=False) as scheduler,
    ):
        server.push(spend_limit)
        with pytest.raises(InvalidRequest, match="spend limit"):
            await scheduler.complete(provider, QUESTION)
        metrics = scheduler.metrics()
    assert len(server.received) == 1
    assert (metrics.requests, metrics.retries, metrics.failed) == (1, 0, 1)
