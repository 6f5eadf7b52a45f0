"""The presets: what each one pins, and that the default preset is the cheap one it claims to be."""

from __future__ import annotations

import attrs
import numpy as np
import pytest

from evomerge_sdk.engine import (
    DEFAULT,
    LORAHUB,
    PAPER,
    PRESETS,
    Candidate,
    EvoMerge,
    StageConfig,
    ablations,
    preset,
)
from evomerge_sdk.errors import ConfigError
from evomerge_sdk.local.repository import Repository, RepositoryConfig, build_repository
from evomerge_sdk.testing import LocalObjective


def test_default_preset_is_a_minibatch_search_sized_for_any_pool() -> None:
    s = DEFAULT.scale
    assert DEFAULT.denoise is None and s is not None  # no stage 1: it did not pay over cases
    assert s.batch_size == 20
    assert s.sigma_scaling == "sqrt" and s.start == "1/N" and (s.lower, s.upper) == (-1.5, 1.5)
    assert s.sigma_value(20) == pytest.approx(s.sigma) and s.sigma_value(100) < s.sigma / 2
    assert s.use_diagonal(100) and not s.use_diagonal(20)
    # Generations on 20 examples each, and the CMA mean on all 300 (the paper's split) every 10th
    # generation and at the end.
    assert s.rescore_every == 10
    queries = s.max_evaluations * 20 + (s.max_evaluations // 200 + 1) * 300
    # A tenth of the paper protocol's ~215,000 when its early stopping fires (benchmarks/cost.py).
    assert queries <= 0.1 * 200_000
    assert DEFAULT.early_stopping is None


def test_ablations_at_equal_budget_move_the_dropped_stage_budget() -> None:
    two = preset("two-stage")
    plain = ablations(two)
    equal = ablations(two, keep_budget=True)
    assert two.denoise is not None and two.scale is not None
    total = two.denoise.max_evaluations + two.scale.max_evaluations
    assert plain["no_denoising"].scale == two.scale
    no_denoising = equal["no_denoising"].scale
    no_scaling = equal["no_scaling"].denoise
    assert no_denoising is not None and no_scaling is not None
    assert no_denoising.max_evaluations == no_scaling.max_evaluations == total
    # The two-stage search without its stage 1 is the default's search, at the default's budget.
    assert no_denoising == DEFAULT.scale
    negative = equal["no_negative_betas"].scale
    assert negative is not None and negative.lower == 0.0
    assert negative.max_evaluations == two.scale.max_evaluations
    assert set(PRESETS) >= {"paper", "default", "lorahub", "paper/no_denoising", "default/no_denoising"}
    assert preset("default/no_denoising").scale == DEFAULT.scale
    no_negative = preset("default/no_negative_betas").scale
    assert no_negative == attrs.evolve(DEFAULT.scale, lower=0.0)
    assert preset("two-stage/no_scaling").scale is None
    with pytest.raises(ConfigError, match="both stages"):
        ablations(LORAHUB)


@pytest.fixture(scope="module")
def repo() -> Repository:
    # The small world with the paper's 300 validation examples, so DEFAULT runs unchanged.
    return build_repository(attrs.evolve(RepositoryConfig.small(), validation_size=300), use_cache=False)


@pytest.mark.anyio
async def test_default_preset_matches_the_paper_protocol_for_a_tenth_of_its_queries(
    repo: Repository,
) -> None:
    paper_losses, default_losses = [], []
    for target in repo.targets()[:2]:
        pool = repo.pool(target, 10, seed=0)
        paper_obj = LocalObjective(repo, pool, target)
        paper_losses.append((await EvoMerge(paper_obj, len(pool), PAPER).run()).loss)
        default_obj = LocalObjective(repo, pool, target)
        result = await EvoMerge(default_obj, len(pool), DEFAULT).run()
        default_losses.append(result.loss)
        assert default_obj.queries <= 0.1 * 1200 * 300  # the protocol's nominal cost
        uniform = Candidate(np.ones(len(pool)), np.full(len(pool), 1 / len(pool)))
        assert result.loss < default_obj.metrics(uniform, "validation").loss
    assert np.mean(default_losses) <= 1.01 * np.mean(paper_losses)


def test_stage_config_round_trips_with_the_new_fields() -> None:
    stage = StageConfig(
        start=0.5, sigma=0.1, lower=0.0, upper=1.0, max_evaluations=20, batch_size=7, rescore_every=3
    )
    assert StageConfig.from_dict(stage.to_dict()) == stage
    assert PAPER.scale is not None and PAPER.scale.batch_size is None and PAPER.scale.sigma_scaling == "none"
