"""The OpenAI adapter under the scheduler: its errors drive the scheduler's retries and limits."""

from __future__ import annotations

import pytest
from evomerge_openai import OpenAIProvider
from wire_servers import Failure, OpenAIWireServer, serve

from evomerge_sdk import ChatRequest, InvalidRequest
from evomerge_sdk.scheduler import RetryPolicy, Scheduler

pytestmark = pytest.mark.anyio

QUESTION = ChatRequest(model="gpt-4o-mini", messages="What is the capital of France?", max_tokens=16)


async def test_scheduler_retries_429_and_5xx_and_adopts_the_reported_limits() -> None:
    rate_limited = Failure(
        429,
        "tokens",
        "Rate limit reached for tokens",
        headers={
            "retry-after-ms": "20",
            "x-ratelimit-limit-tokens": "90000",
            "x-ratelimit-remaining-tokens": "0",
        },
    )
    async with (
        serve(OpenAIWireServer()) as server,
        OpenAIProvider(base_url=server.base_url, api_key=server.api_key) as provider,
        Scheduler(retry=RetryPolicy(seed=3, base_delay=0.01), cache=False) as scheduler,
    ):
        server.push(rate_limited, Failure(503, "server_error", "The engine is currently overloaded"))
        completion = await scheduler.complete(provider, QUESTION)
        metrics = scheduler.metrics()
        assert scheduler.limiter("gpt-4o-mini").tpm == 90000  # adopted from the 429's headers

    assert completion.text == server.sent[0].choices[0].message.content
    assert len(server.received) == 3 and all(r.body == server.received[0].body for r in server.received)
    assert (metrics.requests, metrics.retries, metrics.rate_limited, metrics.succeeded) == (3, 2, 1, 1)
    assert metrics.tokens_in == completion.usage.input_tokens


async def test_scheduler_does_not_retry_an_exhausted_quota() -> None:
    async with (
        serve(OpenAIWireServer()) as server,
        OpenAIProvider(base_url=server.base_url, api_key=server.api_key) as provider,
        Scheduler(retry=RetryPolicy(seed=3, base_delay=0.01), cache=False) as scheduler,
    ):
        server.push(
            Failure(429, "insufficient_quota", "You exceeded your current quota", code="insufficient_quota")
        )
        with pytest.raises(InvalidRequest, match="quota"):
            await scheduler.complete(provider, QUESTION)
        metrics = scheduler.metrics()
    assert len(server.received) == 1
    assert (metrics.requests, metrics.retries, metrics.failed) == (1, 0, 1)
