"""What a search will spend, counted before it runs, and a search sized to a spend.

The unit is the query: one validation (or held-out) example scored by one candidate, which is what a
merge service bills in tokens. Comparing two searches at equal cost, or planning a search to a user's
budget, needs this count without running anything; the count is an upper bound, since a stage may also
stop early (tolerances, held-out early stopping).
"""

from __future__ import annotations

import math

import attrs

from .._checks import is_int
from ..errors import ConfigError
from ._config import SearchConfig, StageConfig

__all__ = ["fit_to_queries", "planned_queries"]


def _stage_queries(stage: StageConfig, n: int, examples: int, held_out: int, early: bool) -> int:
    popsize = stage.popsize_value(n)
    generations = stage.max_evaluations // popsize
    if stage.batch_size is None:
        per_generation = popsize * examples
        rescores = 0
    else:
        per_generation = popsize * min(stage.batch_size, examples)
        # Every `rescore_every`-th generation scores the mean on the whole split, and the stage's end does
        # unless its last generation just did.
        every = stage.rescore_every
        periodic = generations // every if every else 0
        rescores = periodic + (0 if every and generations % every == 0 else 1)
    checks = generations * held_out if early else 0
    return generations * per_generation + rescores * examples + checks


def planned_queries(config: SearchConfig, n: int, examples: int, held_out: int = 0) -> int:
    """The most queries `config` spends on `n` models, `examples` validation and `held_out` held-out ones."""
    if not isinstance(config, SearchConfig):
        raise ConfigError(f"config must be a SearchConfig (see preset), got {config!r:.60}")
    for name, value in (("n", n), ("examples", examples), ("held_out", held_out)):
        if not is_int(value) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    if n < 1 or examples < 1:
        raise ConfigError(f"a search needs a model and an example, got n={n}, examples={examples}")
    early = config.early_stopping is not None
    return sum(_stage_queries(stage.config, n, examples, held_out, early) for stage in config.stages())


def _scaled(config: SearchConfig, factor: float, n: int) -> SearchConfig:
    """`config` with every stage's generations times `factor` (at least one generation each)."""

    def scale(stage: StageConfig | None) -> StageConfig | None:
        if stage is None:
            return None
        popsize = stage.popsize_value(n)
        generations = max(1, math.floor(factor * (stage.max_evaluations // popsize)))
        return attrs.evolve(stage, max_evaluations=generations * popsize)

    return attrs.evolve(config, denoise=scale(config.denoise), scale=scale(config.scale))


def fit_to_queries(
    config: SearchConfig, n: int, examples: int, max_queries: int, held_out: int = 0
) -> SearchConfig:
    """`config` with its stage budgets scaled alike, as large as `planned_queries` fits in `max_queries`.

    Every stage keeps its share of the generations, so a preset's design (how it splits its budget between
    denoising and scaling, how often it re-scores) carries over to any spend.
    """
    if not is_int(max_queries) or max_queries < 1:
        raise ConfigError(f"max_queries must be a positive integer, got {max_queries!r}")
    smallest = _scaled(config, 0.0, n)
    if planned_queries(smallest, n, examples, held_out) > max_queries:
        raise ConfigError(
            f"{max_queries:,} queries do not pay for one generation per stage of the {config.name!r} search "
            f"({planned_queries(smallest, n, examples, held_out):,} needed)"
        )
    low, high = 0.0, 1.0
    while planned_queries(_scaled(config, high, n), n, examples, held_out) <= max_queries:
        low, high = high, 2 * high
    for _ in range(60):  # bisection on the factor; the count is monotone in it
        middle = (low + high) / 2
        if planned_queries(_scaled(config, middle, n), n, examples, held_out) <= max_queries:
            low = middle
        else:
            high = middle
    return _scaled(config, low, n)
