"""Output-space objective: option scores from logprobs (with the floor) or votes, the loss on cached
scores, and score collection over real loopback servers (the embedded service's OpenAI-compatible route,
and the Anthropic wire-validated server for the vote path), cached so a second pass sends nothing."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
from evomerge_anthropic import AnthropicProvider
from evomerge_openai import OpenAIProvider
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_servers import Answer, AnthropicWireServer, serve

from evomerge_sdk.engine import DEFAULT, Candidate, EvaluationContext, EvoMerge, Split, merge_outputs
from evomerge_sdk.errors import BadResponse, ConfigError
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.objectives import (
    AnswerSet,
    LabelledExamples,
    OutputScores,
    OutputSpaceObjective,
    ScoringConfig,
    accuracy,
    collect_scores,
    cross_entropy,
    log_softmax,
    macro_f1,
    vote_scores,
)
from evomerge_sdk.providers import Completion, TokenLogprob
from evomerge_sdk.scheduler import Scheduler

OPTIONS = AnswerSet(("red", "green", "blue"))


def test_answer_set_matches_tokens_and_floors_the_unlisted() -> None:
    listed = [(" Red", math.log(0.5)), ("red", math.log(0.1)), ("gr", math.log(0.2)), ("x", math.log(0.05))]
    scores = OPTIONS.token_scores(listed)
    # both spellings of red add up; "gr" is a listed prefix of green
    assert scores[0] == pytest.approx(math.log(0.6))
    assert scores[1] == pytest.approx(math.log(0.2))
    # blue is unlisted: the 0.15 the list leaves over (one missing option), capped by the lowest listed
    assert scores[2] == pytest.approx(min(math.log(0.05), math.log(1 - 0.85)))
    assert OPTIONS.match_text("  Blue. because") == 2
    assert OPTIONS.match_text("purple") is None
    with pytest.raises(BadResponse):
        OPTIONS.token_scores([])


def test_answer_set_and_examples_refuse_bad_input() -> None:
    with pytest.raises(ConfigError):
        AnswerSet(("yes",))
    with pytest.raises(ConfigError):
        AnswerSet(("Yes", "yes "))
    with pytest.raises(ConfigError, match="not in the answer set"):
        LabelledExamples.of(["q"], ["purple"], OPTIONS)
    with pytest.raises(ConfigError):
        LabelledExamples.of(["q", "r"], ["red"], OPTIONS)
    with pytest.raises(ConfigError):
        ScoringConfig(temperature=0.0)


def test_vote_scores_are_smoothed_log_frequencies() -> None:
    out = vote_scores([3, 0, 1], samples=4, smoothing=1.0)
    assert np.exp(out).sum() == pytest.approx(1.0)
    assert out[0] == pytest.approx(math.log(4 / 7))
    assert np.isfinite(out).all()


def test_metrics() -> None:
    z = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 2.0, 1.0]])
    y = np.array([0, 2, 0])
    assert accuracy(z, y) == pytest.approx(2 / 3)
    assert np.exp(log_softmax(z)).sum(axis=1) == pytest.approx(np.ones(3))
    ls = log_softmax(z)
    assert cross_entropy(z, y) == pytest.approx(-(ls[0, 0] + ls[1, 2] + ls[2, 0]) / 3)
    assert 0 < macro_f1(z, y) < 1


def _scores(rng: np.random.Generator, n: int, e: int, k: int) -> OutputScores:
    return OutputScores(rng.normal(size=(n, e, k)), rng.normal(size=(e, k)), rng.integers(0, k, size=e))


@pytest.mark.anyio
async def test_objective_scores_the_merge_on_the_split_and_minibatch() -> None:
    rng = np.random.default_rng(0)
    val, held = _scores(rng, 4, 30, 3), _scores(rng, 4, 10, 3)
    objective = OutputSpaceObjective(val, held)
    c = Candidate(np.array([1.0, 0.5, 0.0, 1.0]), np.array([0.3, -0.2, 1.0, 0.1]))
    expected = cross_entropy(merge_outputs(val.reference, val.pool, c.alpha, c.beta), val.labels)
    ctx = EvaluationContext(Split.VALIDATION, "scale", 0, seed=7)
    assert (await objective([c], ctx))[0] == pytest.approx(expected)
    ctx_h = EvaluationContext(Split.HELD_OUT, "scale", 0, seed=7)
    expected_h = cross_entropy(merge_outputs(held.reference, held.pool, c.alpha, c.beta), held.labels)
    assert (await objective([c], ctx_h))[0] == pytest.approx(expected_h)
    mini = EvaluationContext(Split.VALIDATION, "scale", 0, seed=7, batch_size=8)
    idx = mini.minibatch(30)
    assert idx is not None
    z = merge_outputs(val.reference[idx], val.pool[:, idx], c.alpha, c.beta)
    assert (await objective([c], mini))[0] == pytest.approx(cross_entropy(z, val.labels[idx]))
    assert objective.evaluations == 3
    with pytest.raises(ConfigError, match="held-out"):
        await OutputSpaceObjective(val)([c], ctx_h)
    with pytest.raises(ConfigError):
        OutputScores(np.zeros((2, 3, 2)), np.zeros((3, 3)), np.zeros(3))


@pytest.mark.anyio
async def test_search_on_cached_scores_beats_every_single_model() -> None:
    # Three informative but noisy models: their merge should beat each one alone.
    rng = np.random.default_rng(1)
    e, k = 200, 4
    labels = rng.integers(0, k, size=e)
    truth = np.eye(k)[labels] * 2.0
    pool = np.stack([truth + rng.normal(scale=2.0, size=(e, k)) for _ in range(3)])
    data = OutputScores(pool, np.zeros((e, k)), labels)
    objective = OutputSpaceObjective(data)
    import attrs

    config = attrs.evolve(DEFAULT, early_stopping=None)
    result = await EvoMerge(objective, 3, config).run()
    singles = [cross_entropy(pool[i], labels) for i in range(3)]
    assert result.loss < min(singles)


@pytest.mark.anyio
async def test_collect_logprob_scores_from_the_embedded_openai_route_once(
    service: LocalService, repo: Any
) -> None:
    target = repo.targets()[0]
    ex = target.validation.subset(slice(0, 12))
    tokens = repo.tokenizer.tokens
    options = [tokens[int(i)] for i in ex.answer_ids]
    data = LabelledExamples.of(list(ex.prompts), [tokens[int(i)] for i in ex.labels], options)
    models = [repo.adapter_names[0], "base"]
    provider = OpenAIProvider(base_url=f"{service.url}/v1")
    try:
        async with Scheduler() as scheduler:
            table = await collect_scores(scheduler, provider, models, data)
            assert table.scores.shape == (2, 12, len(options))
            assert scheduler.metrics().succeeded == 24
            # the answer-set log-probabilities the repository computes, wherever the top 20 listed them
            for m, name in enumerate(models):
                weights = repo.base if name == "base" else repo.single(name)
                full = repo.next_token_logprobs_ids(weights, ex.ids, ex.lengths)
                exact = full[:, ex.answer_ids]
                cutoff = np.sort(full, axis=1)[:, -20][:, None]
                listed = exact >= cutoff
                assert np.allclose(table.scores[m][listed], exact[listed], atol=1e-5)
                assert np.all(table.scores[m][~listed] <= cutoff.repeat(len(options), 1)[~listed] + 1e-9)
            again = await collect_scores(scheduler, provider, models, data)
            assert scheduler.metrics().succeeded == 24  # the second pass came from the cache
            assert again.cached == 24
            assert np.array_equal(again.scores, table.scores)
    finally:
        await provider.aclose()


@pytest.mark.anyio
async def test_votes_for_a_provider_without_logprobs_over_the_anthropic_wire() -> None:
    first = LabelledExamples.of(["first?"], ["red"], OPTIONS)
    second = LabelledExamples.of(["second?"], ["blue"], OPTIONS)
    async with serve(AnthropicWireServer()) as server:
        provider = AnthropicProvider(api_key=server.api_key, base_url=server.base_url)
        config = ScoringConfig(samples=4, temperature=0.8, smoothing=0.5, max_tokens=3)
        assert config.method_for(provider) == "votes"
        try:
            async with Scheduler() as scheduler:
                # 4 samples per prompt: red, Red., green, "no idea" (no option); then blue x4
                server.push(*(Answer(text=t) for t in ("red", "Red.", "green", "no idea")))
                one = await collect_scores(scheduler, provider, ["claude-x"], first, config)
                server.push(*(Answer(text="blue") for _ in range(4)))
                two = await collect_scores(scheduler, provider, ["claude-x"], second, config)
                assert len(server.received) == 8
                assert all(r.body["temperature"] == 0.8 for r in server.received)
                assert "seed" not in server.received[0].body  # Anthropic takes no seed
                assert np.allclose(one.scores[0, 0], vote_scores([2, 1, 0], 4, 0.5))
                assert np.allclose(two.scores[0, 0], vote_scores([0, 0, 4], 4, 0.5))
                assert one.requests == 4
                again = await collect_scores(scheduler, provider, ["claude-x"], first, config)
                assert len(server.received) == 8  # every sample was cached under its own index
                assert again.cached == 4
                assert np.array_equal(again.scores, one.scores)
        finally:
            await provider.aclose()
        counts = Counter(r.body["messages"][0]["content"] for r in server.received)
        assert counts == {"first?": 4, "second?": 4}


def test_score_completion_needs_logprobs() -> None:
    from evomerge_sdk.objectives import score_completion

    with pytest.raises(BadResponse, match="votes"):
        score_completion(Completion(text="red", model="m"), OPTIONS)
    lp = (TokenLogprob("red", -0.1, (("red", -0.1), ("blue", -2.5))),)
    out = score_completion(Completion(text="red", model="m", logprobs=lp), OPTIONS)
    assert out[0] == pytest.approx(-0.1) and out[2] == pytest.approx(-2.5)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 5),
    k=st.integers(2, 6),
    ties=st.booleans(),
)
def test_precomputed_merge_equals_merge_outputs(seed: int, n: int, k: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    pool = rng.normal(size=(n, 12, k))
    if ties:
        pool = np.round(pool)  # equal magnitudes: the tie order must match too
    data = OutputScores(pool, np.zeros((12, k)) if ties else rng.normal(size=(12, k)), rng.integers(0, k, 12))
    alpha = rng.choice([0.0, 0.3, 0.5, 1.0, rng.uniform()], size=n)
    beta = rng.normal(size=n)
    expected = merge_outputs(data.reference, data.pool, alpha, beta)
    assert np.allclose(data.merged(alpha, beta), expected, atol=1e-12)
    idx = np.array([1, 4, 7])
    assert np.allclose(data.merged(alpha, beta, idx), expected[idx], atol=1e-12)


def test_prune_drops_models_that_do_not_matter_within_the_tolerance() -> None:
    rng = np.random.default_rng(3)
    e, k = 100, 3
    labels = rng.integers(0, k, size=e)
    useful = np.eye(k)[labels] * 3.0 + rng.normal(size=(e, k))
    reference = rng.normal(size=(e, k))
    pool = np.stack([useful, reference.copy(), reference + 1e-3 * rng.normal(size=(e, k))])
    objective = OutputSpaceObjective(OutputScores(pool, reference, labels))
    c = Candidate(np.ones(3), np.array([1.0, 0.7, 0.2]))
    pruned = objective.prune(c, tolerance=0.001)
    assert pruned.beta[0] == 1.0 and pruned.beta[1] == 0.0 and pruned.beta[2] == 0.0
    assert list(pruned.alpha) == [1.0, 0.0, 0.0]
    before = cross_entropy(objective.validation.merged(c.alpha, c.beta), labels)
    after = cross_entropy(objective.validation.merged(pruned.alpha, pruned.beta), labels)
    assert after <= before * 1.001
    with pytest.raises(ConfigError):
        objective.prune(c, tolerance=-1.0)
