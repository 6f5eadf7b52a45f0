"""LocalObjective: the engine's objective on the embedded repository, its accounting, cache and budget."""

from __future__ import annotations

import attrs
import numpy as np
import pytest

from evomerge_sdk.engine import (
    Candidate,
    EvaluationContext,
    EvoMerge,
    SearchConfig,
    Split,
    StageConfig,
    StopReason,
)
from evomerge_sdk.errors import BudgetExceeded, ConfigError
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.testing import LocalObjective, ObjectiveUsage


def make(repo: Repository, **kwargs: int) -> LocalObjective:
    target = repo.targets()[0]
    return LocalObjective(repo, repo.pool(target, 6, seed=0), target, **kwargs)


def candidates(n: int, k: int, seed: int = 0) -> list[Candidate]:
    rng = np.random.default_rng(seed)
    return [Candidate(rng.uniform(0, 1, n), rng.uniform(-0.5, 0.5, n)) for _ in range(k)]


def ctx(split: Split = Split.VALIDATION, batch: int | None = None, seed: int = 7) -> EvaluationContext:
    return EvaluationContext(split, "test", 0, seed, batch_size=batch)


@pytest.mark.anyio
async def test_losses_are_the_repository_loss_and_usage_counts_examples_and_tokens(repo: Repository) -> None:
    obj = make(repo)
    target = obj.target
    cands = candidates(obj.n_models, 3)
    losses = await obj(cands, ctx())
    for c, loss in zip(cands, losses, strict=True):
        expected = repo.evaluate(obj.merger.merge(c.alpha, c.beta), target.validation).loss
        assert loss == pytest.approx(expected, rel=1e-12)
    n_val = len(target.validation)
    val_tokens = int((target.validation.lengths + 1).sum())
    assert obj.usage == ObjectiveUsage(queries=3 * n_val, tokens=3 * val_tokens, evaluations=3, cached=0)
    held = await obj(cands[:1], ctx(Split.HELD_OUT))
    assert held[0] == pytest.approx(repo.evaluate(obj.weights(cands[0]), target.holdout).loss, rel=1e-12)
    assert obj.queries == 3 * n_val + len(target.holdout)
    assert obj.tokens == 3 * val_tokens + int((target.holdout.lengths + 1).sum())


@pytest.mark.anyio
async def test_minibatch_scores_the_contexts_examples_and_the_cache_charges_only_new_ones(
    repo: Repository,
) -> None:
    obj = make(repo)
    n_val = obj.split_size(Split.VALIDATION)
    context = ctx(batch=10)
    index = context.minibatch(n_val)
    assert index is not None
    cands = candidates(obj.n_models, 2)
    mini = await obj(cands, context)
    sub = obj.target.validation.subset(index)
    for c, loss in zip(cands, mini, strict=True):
        assert loss == pytest.approx(repo.evaluate(obj.weights(c), sub).loss, rel=1e-12)
    sub_tokens = int((sub.lengths + 1).sum())
    assert (obj.queries, obj.tokens) == (20, 2 * sub_tokens)
    # The same candidates on the whole split: only the examples they have not been scored on are paid.
    full = await obj(cands, ctx())
    assert obj.queries == 20 + 2 * (n_val - 10)
    assert obj.usage.cached == 20
    fresh = make(repo, cache_size=0)
    # float32 forward passes over different batches agree to float32 rounding.
    assert full == pytest.approx(await fresh(cands, ctx()), rel=1e-6)
    # Asking again is free; without a cache it is paid again.
    await obj(cands, ctx())
    await fresh(cands, ctx())
    assert obj.queries == 2 * n_val and fresh.queries == 4 * n_val


@pytest.mark.anyio
async def test_budget_refuses_a_call_before_scoring_and_the_search_stops_cleanly(repo: Repository) -> None:
    n_val = len(repo.targets()[0].validation)
    obj = make(repo, max_queries=2 * n_val + 5)
    await obj(candidates(6, 2), ctx())
    with pytest.raises(BudgetExceeded) as info:
        await obj(candidates(6, 1, seed=1), ctx())
    assert isinstance(info.value.spent, ObjectiveUsage) and info.value.spent.queries == 2 * n_val
    assert obj.queries == 2 * n_val  # nothing was scored
    config = SearchConfig(
        name="tiny",
        denoise=None,
        scale=StageConfig(
            start="1/N",
            sigma=0.1,
            lower=-1.5,
            upper=1.5,
            popsize=4,
            max_evaluations=400,
            batch_size=10,
            rescore_every=2,
        ),
    )
    budgeted = make(repo, max_queries=300)
    result = await EvoMerge(budgeted, 6, config).run()
    assert result.stop_reason is StopReason.BUDGET_EXCEEDED
    assert budgeted.queries <= 300 and result.loss == pytest.approx(
        budgeted.metrics(result.candidate, "validation").loss, rel=1e-6
    )


@pytest.mark.anyio
async def test_a_minibatch_search_on_the_repository_beats_the_uniform_merge(repo: Repository) -> None:
    obj = make(repo)
    n = obj.n_models
    config = SearchConfig(
        name="mini",
        denoise=None,
        scale=StageConfig(
            start="1/N", sigma=0.2, lower=-1.5, upper=1.5, popsize=8, max_evaluations=240, batch_size=20
        ),
        seed=3,
    )
    result = await EvoMerge(obj, n, config).run()
    uniform = Candidate(np.ones(n), np.full(n, 1 / n))
    assert result.loss < obj.metrics(uniform, "validation").loss - 0.05
    # The loss reported is the returned merge's loss on the whole validation split.
    assert result.loss == pytest.approx(obj.metrics(result.candidate, "validation").loss, rel=1e-12)
    # 30 generations of 8 candidates on 20 examples, then the mean on the whole split (60 examples).
    assert result.evaluations == 30 * 8 + 1
    assert obj.queries == 30 * 8 * 20 + 60 and obj.usage.cached == 0
    again = make(repo)
    assert (await EvoMerge(again, n, config).run()).to_dict() == result.to_dict()
    other = await EvoMerge(make(repo), n, attrs.evolve(config, seed=4)).run()
    assert other.candidate != result.candidate


@pytest.mark.anyio
async def test_bad_input(repo: Repository) -> None:
    obj = make(repo)
    with pytest.raises(ConfigError, match="7 models, the pool 6"):
        await obj(candidates(7, 1), ctx())
    with pytest.raises(ConfigError, match="max_queries"):
        make(repo, max_queries=0)
    with pytest.raises(ConfigError, match="cache_size"):
        make(repo, cache_size=-1)
    with pytest.raises(ConfigError, match="split must be"):
        obj.metrics(candidates(6, 1)[0], "train")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown target"):
        LocalObjective(repo, repo.adapter_names[:3], "ood:nothing")
    with pytest.raises(ConfigError, match="unknown adapter"):
        LocalObjective(repo, ["no-such-adapter"], repo.targets()[0])
