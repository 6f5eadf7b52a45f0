"""The embedded service's chat route speaks OpenAI's wire format: the official SDK and the SDK's adapter."""

from __future__ import annotations

import pytest

from evomerge_sdk.errors import InvalidRequest
from evomerge_sdk.local.faults import ServerLimits
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.providers import ChatRequest
from evomerge_sdk.scheduler import RetryPolicy, Scheduler


@pytest.mark.anyio
async def test_official_openai_client(repo: Repository) -> None:
    openai = pytest.importorskip("openai")
    prompt = repo.target("ood:ner/news").validation.prompts[0]
    async with LocalService(repo, pool_sizes=(5,), api_key="sk-embedded-1") as svc:
        client = openai.AsyncOpenAI(base_url=f"{svc.url}/v1", api_key="sk-embedded-1", max_retries=0)
        try:
            reply = await client.chat.completions.create(
                model="re/bio",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=1,
                logprobs=True,
                top_logprobs=3,
            )
            models = await client.models.list()
            wrong = openai.AsyncOpenAI(base_url=f"{svc.url}/v1", api_key="wrong", max_retries=0)
            try:
                with pytest.raises(openai.AuthenticationError):
                    await wrong.chat.completions.create(
                        model="base", messages=[{"role": "user", "content": "x"}]
                    )
            finally:
                await wrong.close()
        finally:
            await client.close()
    want = repo.top_logprobs(repo.single("re/bio"), prompt, 3)
    assert reply.choices[0].message.content == want[0][0]
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
    content = reply.choices[0].logprobs.content[0]
    assert [(t.token, t.logprob) for t in content.top_logprobs] == want
    assert reply.usage is not None and reply.usage.completion_tokens == 1
    assert {"base", "re/bio"} <= {m.id for m in models.data}


@pytest.mark.anyio
async def test_evomerge_openai_adapter_through_the_scheduler(repo: Repository) -> None:
    adapter = pytest.importorskip("evomerge_openai")
    prompt = repo.target("ood:ner/news").validation.prompts[1]
    limits = ServerLimits(rpm=600, burst_seconds=0.2)
    async with (
        LocalService(repo, pool_sizes=(5,), limits=limits) as svc,
        adapter.OpenAIProvider(base_url=f"{svc.url}/v1", api_key="unused") as provider,
        Scheduler(retry=RetryPolicy(max_attempts=20, base_delay=0.01)) as scheduler,
    ):
        requests = [
            ChatRequest(model=m, messages=prompt, max_tokens=1, logprobs=True, top_logprobs=2)
            for m in ("base", "ner/bio", "re/news", "et/news", "ner/law", "re/law")
        ]
        completions = [await scheduler.complete(provider, r) for r in requests]
        with pytest.raises(InvalidRequest, match="does not exist"):
            await scheduler.complete(provider, ChatRequest(model="nope", messages=prompt, max_tokens=1))
        served = svc.stats.served_requests
    for request, completion in zip(requests, completions, strict=True):
        weights = repo.base if request.model == "base" else repo.single(request.model)
        want = repo.top_logprobs(weights, prompt, 2)
        assert completion.text == want[0][0]
        assert completion.logprobs is not None and list(completion.logprobs[0].top) == want
    # every request was served exactly once: 429s were refused before any work, then retried
    assert served == len(requests)
    assert scheduler.metrics().rate_limited == svc.stats.rate_limited
