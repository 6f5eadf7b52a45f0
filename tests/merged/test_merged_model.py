"""MergedModel: used like a chat model in both modes, querying only models with a non-zero weight (counted
by a wire-validated OpenAI server), answering as the offline merge does, saved and loaded as JSON."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from evomerge_openai import OpenAIProvider
from wire_servers import Answer, OpenAIWireServer, serve

from evomerge_sdk.engine import merge_outputs
from evomerge_sdk.errors import ConfigError
from evomerge_sdk.local import preset_id
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.merged import MergedModel, MergedSpec, load_spec, save_spec
from evomerge_sdk.objectives import LabelledExamples, collect_scores
from evomerge_sdk.scheduler import Scheduler
from evomerge_sdk.service import MergeServiceClient

OPTIONS = ("red", "green", "blue")


def _spec(reference: str = "base") -> MergedSpec:
    return MergedSpec(
        mode="output",
        pool=("a", "b", "c", "d"),
        alpha=(1.0, 0.0, 0.5, 1.0),
        beta=(0.5, 1.0, 0.0, -0.3),
        reference=reference,
        answer_set=OPTIONS,
        source={"kind": "openai", "base_url": "http://127.0.0.1:1/v1"},
    )


@pytest.mark.anyio
async def test_output_mode_queries_only_models_with_non_zero_alpha_and_beta() -> None:
    async with serve(OpenAIWireServer(api_key=None)) as server:
        provider = OpenAIProvider(base_url=server.base_url)
        try:
            server.push(*(Answer(text="red") for _ in range(3)))
            async with MergedModel(_spec(), provider=provider) as merged:
                completion = await merged.complete([{"role": "user", "content": "which colour"}])
                assert merged.models_queried == Counter({"base": 1, "a": 1, "d": 1})
            asked = Counter(r.body["model"] for r in server.received)
            assert asked == Counter({"base": 1, "a": 1, "d": 1})  # b (alpha 0) and c (beta 0) never asked
            assert all(r.body["logprobs"] and r.body["top_logprobs"] == 20 for r in server.received)
            assert all(r.body["max_tokens"] == 1 for r in server.received)
            assert completion.text in OPTIONS
            assert completion.model == "evomerge-merged"
            # usage sums the three queries: 2 prompt words and 1 answer word each
            assert (completion.usage.input_tokens, completion.usage.output_tokens) == (6, 3)
            assert completion.logprobs is not None
            top = completion.logprobs[0].top
            assert top[0][0] == completion.text
            assert sum(np.exp(lp) for _, lp in top) == pytest.approx(1.0)
            # with the pool mean as reference, the mean needs every pool model (and no base)
            async with MergedModel(_spec("mean"), provider=provider) as merged:
                await merged.complete("which colour")
                assert merged.models_queried == Counter({"a": 1, "b": 1, "c": 1, "d": 1})
        finally:
            await provider.aclose()


@pytest.mark.anyio
async def test_output_mode_answers_as_the_offline_merge_of_the_cached_scores(
    service: LocalService, repo: Any
) -> None:
    target = repo.targets()[0]
    pool = repo.pool(target, 4, 0)
    tokens = repo.tokenizer.tokens
    ex = target.test.subset(slice(0, 6))
    options = tuple(tokens[int(i)] for i in ex.answer_ids)
    data = LabelledExamples.of(list(ex.prompts), [tokens[int(i)] for i in ex.labels], options)
    alpha, beta = np.array([1.0, 0.3, 0.0, 0.8]), np.array([0.6, -0.4, 0.9, 0.5])
    spec = MergedSpec(mode="output", pool=pool, alpha=alpha, beta=beta, reference="base", answer_set=options)
    provider = OpenAIProvider(base_url=f"{service.url}/v1")
    try:
        async with Scheduler() as scheduler:
            table = await collect_scores(scheduler, provider, [*pool, "base"], data)
            sent = scheduler.metrics().succeeded
            offline = merge_outputs(table.of("base"), np.stack([table.of(m) for m in pool]), alpha, beta)
            async with MergedModel(spec, provider=provider, scheduler=scheduler) as merged:
                for e in range(len(data)):
                    answer = await merged.complete(data.prompts[e])
                    assert answer.text == options[int(np.argmax(offline[e]))]
            # same requests as the scoring pass: all answered from the scheduler's cache
            assert scheduler.metrics().succeeded == sent
            assert pool[2] not in merged.models_queried
    finally:
        await provider.aclose()


@pytest.mark.anyio
async def test_provider_mode_completes_through_the_merge_service(service: LocalService, repo: Any) -> None:
    target = repo.targets()[0]
    pool = service.repository.pool(target, 4, 0)
    spec = MergedSpec(
        mode="provider",
        pool=pool,
        alpha=(1.0, 0.5, 0.0, 1.0),
        beta=(0.5, 0.5, 0.2, -0.1),
        preset_id=preset_id(target.name, 4),
    )
    prompt = target.test.prompts[0]
    async with MergeServiceClient(service.url) as client:
        async with MergedModel(spec, client=client) as merged:
            completion = await merged.complete(prompt)
        session = await client.create_session(spec.preset_id or "")
        direct = await client.complete(session, spec.alpha, spec.beta, prompt)
    assert completion.text == direct.text
    assert completion.finish_reason == direct.finish_reason == "stop"  # the service's, passed on
    assert completion.usage.input_tokens > 0 and completion.usage.output_tokens == 1
    assert merged.models_queried == Counter({"merge-service": 1})


def test_spec_round_trips_and_loads_from_demo_results(tmp_path: Path) -> None:
    spec = _spec()
    path = save_spec(spec, tmp_path / "merged.json")
    assert load_spec(path) == spec
    assert spec.active == ("a", "d") and spec.queried_models() == ("base", "a", "d")
    out_doc = {"format": "evomerge-sdk/demo-output-result", "merged_model": spec.to_dict()}
    (tmp_path / "out.json").write_text(json.dumps(out_doc))
    assert load_spec(tmp_path / "out.json") == spec
    provider_doc = {
        "format": "evomerge-sdk/demo-result",
        "seed": 3,
        "config": {"repository_seed": 0, "pool_size": 2},
        "pool": ["x", "y"],
        "preset_id": "ood:re/law/pool-2",
        "evo_merging": {"candidate": {"alpha": [1.0, 0.2], "beta": [0.4, -0.1]}},
    }
    (tmp_path / "provider.json").write_text(json.dumps(provider_doc))
    loaded = load_spec(tmp_path / "provider.json")
    assert loaded.mode == "provider" and loaded.preset_id == "ood:re/law/pool-2"
    assert loaded.source == {"kind": "embedded", "repository_seed": 0, "pool_seed": 3, "pool_size": 2}
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="neither"):
        load_spec(tmp_path / "bad.json")


def test_bad_specs_fail_clearly() -> None:
    with pytest.raises(ConfigError, match="as many alpha"):
        MergedSpec(mode="output", pool=("a", "b"), alpha=(1.0,), beta=(1.0, 1.0), answer_set=OPTIONS)
    with pytest.raises(ConfigError, match="preset_id"):
        MergedSpec(mode="provider", pool=("a",), alpha=(1.0,), beta=(1.0,))
    with pytest.raises(ConfigError, match="reference"):
        MergedSpec(mode="output", pool=("a",), alpha=(1.0,), beta=(1.0,), reference="a", answer_set=OPTIONS)
    with pytest.raises(ConfigError, match="provider"):
        MergedModel(_spec())


@pytest.mark.anyio
async def test_a_pool_spread_over_openai_and_anthropic_mixes_logprobs_and_votes() -> None:
    from evomerge_anthropic import AnthropicProvider
    from wire_servers import AnthropicWireServer

    from evomerge_sdk.objectives import ScoringConfig

    spec = MergedSpec(
        mode="output",
        pool=("gpt-x", "claude-x"),
        alpha=(1.0, 1.0),
        beta=(0.5, 0.5),
        reference="base",
        answer_set=OPTIONS,
        scoring=ScoringConfig(samples=3, temperature=0.7),
    )
    async with serve(OpenAIWireServer(api_key=None)) as oai, serve(AnthropicWireServer()) as ant:
        oai.push(Answer(text="blue"), Answer(text="blue"))
        ant.push(*(Answer(text="blue") for _ in range(3)))
        gpt = OpenAIProvider(base_url=oai.base_url)
        claude = AnthropicProvider(api_key=ant.api_key, base_url=ant.base_url)
        try:
            providers = {"base": gpt, "gpt-x": gpt, "claude-x": claude}
            async with MergedModel(spec, provider=providers) as merged:
                answer = await merged.complete("which colour")
        finally:
            await gpt.aclose()
            await claude.aclose()
    assert Counter(r.body["model"] for r in oai.received) == Counter({"base": 1, "gpt-x": 1})
    assert [r.body["model"] for r in ant.received] == ["claude-x"] * 3
    assert all("logprobs" not in r.body for r in ant.received)
    assert answer.text == "blue"
    assert merged.models_queried == Counter({"base": 1, "gpt-x": 1, "claude-x": 1})
