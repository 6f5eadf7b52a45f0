"""Baselines through the same objective: what each evaluates, what it returns, how they rank."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from evomerge_sdk.engine import (
    PAPER,
    Candidate,
    EvaluationContext,
    EvoMerge,
    SearchResult,
    StopReason,
    best_single,
    lorahub,
    random_search,
    task_arithmetic,
    task_arithmetic_grid,
    uniform_merge,
)
from evomerge_sdk.errors import BudgetExceeded, ConfigError
from evomerge_sdk.testing import SyntheticPool

N = 12


class Log:
    def __init__(self, pool: SyntheticPool, budget_at: int | None = None) -> None:
        self.pool = pool
        self.budget_at = budget_at
        self.calls: list[list[Candidate]] = []

    async def __call__(self, candidates: Sequence[Candidate], context: EvaluationContext, /) -> list[float]:
        if len(self.calls) == self.budget_at:
            raise BudgetExceeded("out of budget")
        self.calls.append(list(candidates))
        return await self.pool(candidates, context)


@pytest.fixture(scope="module")
def pool() -> SyntheticPool:
    return SyntheticPool(N, seed=0)


@pytest.mark.anyio
async def test_uniform_merge(pool: SyntheticPool) -> None:
    log = Log(pool)
    result = await uniform_merge(log, N)
    assert len(log.calls) == 1 and len(log.calls[0]) == 1
    assert np.array_equal(result.alpha, np.ones(N)) and np.array_equal(result.beta, np.full(N, 1 / N))
    assert result.method == "uniform" and result.evaluations == 1
    assert result.stop_reason is StopReason.COMPLETED and result.loss == pool.loss(result.candidate)


@pytest.mark.anyio
async def test_best_single_picks_the_lowest_loss_model(pool: SyntheticPool) -> None:
    log = Log(pool)
    result = await best_single(log, N)
    assert len(log.calls) == 1 and len(log.calls[0]) == N
    losses = [pool.loss(c) for c in log.calls[0]]
    i = int(np.argmin(losses))
    assert np.array_equal(result.beta, np.eye(N)[i]) and np.array_equal(result.alpha, np.ones(N))
    assert result.loss == min(losses) and result.evaluations == N


@pytest.mark.anyio
async def test_task_arithmetic_grid_and_choice(pool: SyntheticPool) -> None:
    grid = task_arithmetic_grid(N)
    assert 1 / N in grid and min(grid) < 1 / N and max(grid) == 1.0 and grid == sorted(grid)
    log = Log(pool)
    result = await task_arithmetic(log, N)
    assert [c.beta[0] for c in log.calls[0]] == grid
    assert all(np.array_equal(c.alpha, np.ones(N)) and np.ptp(c.beta) == 0 for c in log.calls[0])
    assert result.loss == min(pool.loss(c) for c in log.calls[0])
    custom = await task_arithmetic(pool, N, [0.3])
    assert np.array_equal(custom.beta, np.full(N, 0.3))
    with pytest.raises(ConfigError, match="lambda grid"):
        await task_arithmetic(pool, N, [])


@pytest.mark.anyio
async def test_lorahub_style_is_one_stage_without_sparsification(pool: SyntheticPool) -> None:
    log = Log(pool)
    result = await lorahub(log, N, max_evaluations=200, seed=1)
    assert result.method == "lorahub" and [s.name for s in result.stages] == ["scale"]
    assert result.evaluations == 200 and result.held_out_evaluations == 0
    assert all(np.array_equal(c.alpha, np.ones(N)) for call in log.calls for c in call)
    first = np.array([c.beta for c in log.calls[0]])
    assert abs(first.mean()) < 0.05  # starts at 0
    assert np.abs(np.array([c.beta for call in log.calls for c in call])).max() <= 1.5
    assert result.fitness == pytest.approx(result.loss + 0.05 * np.mean(np.abs(result.beta)))


@pytest.mark.anyio
async def test_random_search_is_seeded_and_within_budget(pool: SyntheticPool) -> None:
    log = Log(pool)
    a = await random_search(log, N, max_evaluations=50, batch_size=20, seed=3)
    b = await random_search(pool, N, max_evaluations=50, batch_size=20, seed=3)
    c = await random_search(pool, N, max_evaluations=50, batch_size=20, seed=4)
    assert [len(call) for call in log.calls] == [20, 20, 10]
    assert a.to_dict() == b.to_dict() and a.candidate != c.candidate
    assert a.evaluations == 50 and a.loss == min(pool.loss(x) for call in log.calls for x in call)
    every = np.array([[*x.alpha, *x.beta] for call in log.calls for x in call])
    assert every[:, :N].min() >= 0 and every[:, :N].max() <= 1 and np.abs(every[:, N:]).max() <= 1.5
    cut = await random_search(Log(pool, budget_at=1), N, max_evaluations=50, batch_size=20)
    assert cut.stop_reason is StopReason.BUDGET_EXCEEDED and cut.evaluations == 20
    with pytest.raises(BudgetExceeded):
        await random_search(Log(pool, budget_at=0), N, max_evaluations=50)


@pytest.mark.anyio
async def test_bad_arguments(pool: SyntheticPool) -> None:
    with pytest.raises(ConfigError, match="n_models"):
        await uniform_merge(pool, 0)
    with pytest.raises(ConfigError, match="batch_size"):
        await random_search(pool, N, batch_size=0)
    with pytest.raises(ConfigError, match="lower < upper"):
        await random_search(pool, N, beta_bounds=(1.0, -1.0))


@pytest.mark.anyio
async def test_the_search_beats_every_static_baseline(pool: SyntheticPool) -> None:
    search = await EvoMerge(pool, N, PAPER).run()
    static: list[SearchResult] = [
        await uniform_merge(pool, N),
        await best_single(pool, N),
        await task_arithmetic(pool, N),
        await random_search(pool, N, max_evaluations=search.evaluations, seed=0),
    ]
    for baseline in static:
        assert search.loss < baseline.loss, baseline.method
    assert search.loss < 0.8 * min(b.loss for b in static)
