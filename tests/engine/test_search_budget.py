"""Planning a search's spend before it runs (`engine.budget`), and long minibatch stages."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge_sdk.engine import (
    DEFAULT,
    LORAHUB,
    PAPER,
    Candidate,
    EarlyStopping,
    EvaluationContext,
    EvoMerge,
    SearchConfig,
    Split,
    StageConfig,
    StopReason,
    fit_to_queries,
    planned_queries,
    preset,
)
from evomerge_sdk.errors import ConfigError
from evomerge_sdk.testing import SyntheticPool

N = 6
EXAMPLES = {Split.VALIDATION: 300, Split.HELD_OUT: 100}


class CountingObjective:
    """A synthetic pool that counts the examples each call would score on a service."""

    def __init__(self, n: int) -> None:
        self.pool = SyntheticPool(n, seed=2)
        self.queries = 0

    async def __call__(self, candidates: Sequence[Candidate], context: EvaluationContext, /) -> list[float]:
        size = EXAMPLES[context.split]
        index = context.minibatch(size)
        self.queries += len(candidates) * (size if index is None else index.size)
        return list(await self.pool(candidates, context))


def spent(config: SearchConfig, n: int = N) -> int:
    objective = CountingObjective(n)
    anyio.run(EvoMerge(objective, n, config).run)
    return objective.queries


def test_presets_plan_what_the_benchmarks_count() -> None:
    # 900 minibatch evaluations of 20 and 5 re-scorings of the mean (the quality table's 19,500).
    assert planned_queries(DEFAULT, 20, 300) == 45 * 20 * 20 + 5 * 300
    assert planned_queries(LORAHUB, 20, 300) == 800 * 300
    # The paper protocol: 1,200 full evaluations, plus at most one held-out check per generation.
    assert planned_queries(PAPER, 20, 300) == 1200 * 300
    assert planned_queries(PAPER, 20, 300, held_out=100) == 1200 * 300 + 60 * 100


@st.composite
def stages(draw: st.DrawFn, lower: float, early: bool) -> StageConfig:
    popsize = draw(st.integers(2, 8))
    batch_size = draw(st.one_of(st.none(), st.integers(1, 400)))
    # Early stopping on a minibatch stage needs a re-scoring within its patience.
    rescore_every = draw(st.integers(1 if early and batch_size is not None else 0, 4))
    return StageConfig(
        start=0.5,
        sigma=0.2,
        lower=lower,
        upper=1.0,
        max_evaluations=draw(st.integers(popsize, 60)),
        popsize=popsize,
        batch_size=batch_size,
        rescore_every=rescore_every,
        tolfun=0.0,
        tolx=0.0,
    )


@settings(max_examples=25, deadline=None)
@given(data=st.data(), early=st.booleans())
def test_a_search_never_spends_more_than_planned(data: st.DataObject, early: bool) -> None:
    config = SearchConfig(
        name="t",
        denoise=data.draw(stages(0.0, early)),
        scale=data.draw(stages(-1.0, early)),
        early_stopping=EarlyStopping(patience=4) if early else None,
    )
    plan = planned_queries(config, N, 300, held_out=100)
    used = spent(config)
    assert used <= plan
    if not early:  # with every tolerance off, only the budget ends a stage: the plan is exact
        assert used == plan


@pytest.mark.parametrize("n", [20, 100])
@pytest.mark.parametrize("budget", [20_000, 90_000, 240_000, 1_000_000])
def test_fit_to_queries_fills_the_budget_and_keeps_the_preset_shape(n: int, budget: int) -> None:
    two = preset("two-stage")
    fitted = fit_to_queries(two, n, 300, budget)
    plan = planned_queries(fitted, n, 300)
    assert plan <= budget
    assert plan > 0.9 * budget  # within a generation or two of the budget
    assert fitted.denoise is not None and fitted.scale is not None
    assert two.denoise is not None and two.scale is not None
    # Everything but the evaluation counts is the preset's; the stages keep their share (about 9:1).
    for mine, theirs in ((fitted.denoise, two.denoise), (fitted.scale, two.scale)):
        assert attrs.evolve(mine, max_evaluations=theirs.max_evaluations) == theirs
        assert mine.max_evaluations % 20 == 0
    share = fitted.scale.max_evaluations / (fitted.denoise.max_evaluations + fitted.scale.max_evaluations)
    assert share == pytest.approx(0.9, abs=0.03)
    assert attrs.evolve(fitted, denoise=two.denoise, scale=two.scale) == two


def test_fit_to_queries_runs_within_its_plan() -> None:
    small = fit_to_queries(DEFAULT, N, 300, 30_000)
    assert spent(small) == planned_queries(small, N, 300) <= 30_000


def test_budgets_too_small_for_one_generation_and_bad_sizes_are_config_errors() -> None:
    assert DEFAULT.scale is not None
    with pytest.raises(ConfigError, match="does not pay for one generation of 20"):
        attrs.evolve(DEFAULT.scale, max_evaluations=19)
    no_popsize = attrs.evolve(DEFAULT.scale, popsize=None, max_evaluations=5)  # CMA's default: 8 at N=6
    with pytest.raises(ConfigError, match="stage 'scale': max_evaluations=5 does not pay"):
        EvoMerge(CountingObjective(N), N, attrs.evolve(DEFAULT, scale=no_popsize))
    with pytest.raises(ConfigError, match="do not pay for one generation per stage"):
        fit_to_queries(DEFAULT, 20, 300, 600)  # one generation of 20 x 20 and the mean's 300
    with pytest.raises(ConfigError, match="examples"):
        planned_queries(DEFAULT, 20, 0)
    with pytest.raises(ConfigError, match="held_out"):
        planned_queries(DEFAULT, 20, 300, held_out=-1)
    with pytest.raises(ConfigError, match="n must be"):
        planned_queries(DEFAULT, True, 300)  # type: ignore[arg-type]


def test_a_long_minibatch_stage_is_not_stopped_by_noise() -> None:
    # On a converged stage the minibatch values only change with their draw; CMA's stagnation test
    # (after 120+ generations) would read that as no progress and end the stage early.
    stage = StageConfig(
        start="1/N", sigma=0.05, lower=-1.5, upper=1.5, popsize=4, max_evaluations=4 * 300, batch_size=5
    )
    config = SearchConfig(name="long", denoise=None, scale=stage, seed=1)
    objective = CountingObjective(3)
    result = anyio.run(EvoMerge(objective, 3, config).run)
    assert result.stop_reason is StopReason.MAX_EVALUATIONS
    assert result.stages[0].evaluations == 300 * 4 + 1 and np.isfinite(result.loss)
