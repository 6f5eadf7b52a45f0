"""Baselines that run through the same objective as the search and return the same `SearchResult`.

Static merges (uniform, best single model, Task Arithmetic) score a fixed set of candidates in one
objective call and keep the one with the lowest validation loss. LoRAHub-style and the paper's ablations
are configs of the two-stage search (`LORAHUB`, `ablations()`), run by `lorahub` and `EvoMerge`. Random
search samples the same box as the search, in batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import attrs
import numpy as np

from .._checks import is_int, is_number
from ..errors import BudgetExceeded, ConfigError, EvomergeError
from ._cmaes import StopReason
from ._config import LORAHUB
from ._objective import Candidate, EvaluationContext, Objective, Split
from ._search import (
    EvoMerge,
    HistoryPoint,
    ProgressCallback,
    SearchResult,
    StageResult,
    derive_seed,
    evaluate_losses,
)

__all__ = [
    "best_single",
    "lorahub",
    "random_search",
    "task_arithmetic",
    "task_arithmetic_grid",
    "uniform_merge",
]


def _check_n(n_models: int) -> None:
    if not is_int(n_models) or n_models < 1:
        raise ConfigError(f"n_models must be a positive integer, got {n_models!r}")


async def _pick_best(objective: Objective, method: str, candidates: Sequence[Candidate]) -> SearchResult:
    # A fixed candidate list draws nothing at random; the context's seed only has to be fixed.
    context = EvaluationContext(split=Split.VALIDATION, stage=method, generation=0, seed=derive_seed(0, 0, 1))
    losses = await evaluate_losses(objective, candidates, context)
    finite = np.isfinite(losses)
    if not finite.any():
        raise EvomergeError(f"{method}: the objective returned no finite loss")
    best = int(np.argmin(np.where(finite, losses, np.inf)))
    loss = float(losses[best])
    stage = StageResult(
        name=method,
        candidate=candidates[best],
        loss=loss,
        fitness=loss,
        evaluations=len(candidates),
        generations=1,
        stop_reason=StopReason.COMPLETED,
    )
    point = HistoryPoint(method, 1, len(candidates), loss, loss, loss, None)
    return SearchResult(
        method=method,
        candidate=candidates[best],
        loss=loss,
        fitness=loss,
        stop_reason=StopReason.COMPLETED,
        evaluations=len(candidates),
        nonfinite_evaluations=int((~finite).sum()),
        stages=(stage,),
        history=(point,),
    )


async def uniform_merge(objective: Objective, n_models: int) -> SearchResult:
    """Every model whole (alpha = 1) at weight 1/N: one evaluation."""
    _check_n(n_models)
    return await _pick_best(
        objective, "uniform", [Candidate(np.ones(n_models), np.full(n_models, 1.0 / n_models))]
    )


async def best_single(objective: Objective, n_models: int) -> SearchResult:
    """The single model with the lowest validation loss (beta = one-hot, alpha = 1): N evaluations."""
    _check_n(n_models)
    eye = np.eye(n_models)
    return await _pick_best(
        objective, "best_single", [Candidate(np.ones(n_models), eye[i]) for i in range(n_models)]
    )


def task_arithmetic_grid(n_models: int) -> list[float]:
    """Default lambda grid: values around 1/N (this merge scales as N lambda^2) plus the usual 0.1..1."""
    _check_n(n_models)
    near = [k / n_models for k in (0.25, 0.5, 1.0, 2.0, 4.0)]
    return sorted({v for v in [*near, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0] if 0 < v <= 1.5})


async def task_arithmetic(
    objective: Objective, n_models: int, lambdas: Sequence[float] | None = None
) -> SearchResult:
    """Task Arithmetic: alpha = 1, beta = lambda for all models, best lambda of the grid on validation."""
    _check_n(n_models)
    try:
        grid = task_arithmetic_grid(n_models) if lambdas is None else [float(v) for v in lambdas]
    except (TypeError, ValueError):
        raise ConfigError(f"lambdas must be a list of numbers, got {lambdas!r:.60}") from None
    if not grid or not all(math.isfinite(v) for v in grid):
        raise ConfigError("the lambda grid must be a non-empty list of finite numbers")
    return await _pick_best(
        objective, "task_arithmetic", [Candidate(np.ones(n_models), np.full(n_models, v)) for v in grid]
    )


async def lorahub(
    objective: Objective,
    n_models: int,
    *,
    max_evaluations: int = 800,
    seed: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    on_progress: ProgressCallback | None = None,
) -> SearchResult:
    """LoRAHub-style search (the `LORAHUB` preset) with this engine's CMA-ES in place of nevergrad's NGOpt."""
    assert LORAHUB.scale is not None
    config = attrs.evolve(
        LORAHUB, seed=seed, scale=attrs.evolve(LORAHUB.scale, max_evaluations=max_evaluations)
    )
    return await EvoMerge(objective, n_models, config, checkpoint=checkpoint, on_progress=on_progress).run()


async def random_search(
    objective: Objective,
    n_models: int,
    *,
    max_evaluations: int = 800,
    batch_size: int = 20,
    alpha_bounds: tuple[float, float] = (0.0, 1.0),
    beta_bounds: tuple[float, float] = (-1.5, 1.5),
    seed: int = 0,
) -> SearchResult:
    """Uniform samples of (alpha, beta) from the search box, `batch_size` per call; lowest loss wins.

    A `BudgetExceeded` after the first batch stops cleanly with the best so far.
    """
    _check_n(n_models)
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("max_evaluations", max_evaluations, 1),
        ("seed", seed, 0),
    ):
        if not is_int(value) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, bounds, box in (("alpha_bounds", alpha_bounds, (0.0, 1.0)), ("beta_bounds", beta_bounds, None)):
        if not (isinstance(bounds, tuple) and len(bounds) == 2 and all(map(is_number, bounds))):
            raise ConfigError(f"{name} must be a (lower, upper) pair of finite numbers, got {bounds!r:.60}")
        lo, hi = bounds
        if not lo < hi or (box is not None and not box[0] <= lo < hi <= box[1]):
            raise ConfigError(f"{name} need lower < upper{' within [0, 1]' if box else ''}, got [{lo}, {hi}]")
    rng = np.random.Generator(np.random.PCG64(seed))
    best: tuple[float, Candidate] | None = None
    history: list[HistoryPoint] = []
    done = nonfinite = 0
    reason = StopReason.MAX_EVALUATIONS
    while done < max_evaluations:
        k = min(batch_size, max_evaluations - done)
        alphas = rng.uniform(*alpha_bounds, size=(k, n_models))
        betas = rng.uniform(*beta_bounds, size=(k, n_models))
        batch = [Candidate(a, b) for a, b in zip(alphas, betas, strict=True)]
        generation = len(history)
        context = EvaluationContext(
            Split.VALIDATION, "random_search", generation, derive_seed(seed, 0, generation + 1)
        )
        try:
            losses = await evaluate_losses(objective, batch, context)
        except BudgetExceeded:
            if best is None:
                raise
            reason = StopReason.BUDGET_EXCEEDED
            break
        done += k
        finite = np.isfinite(losses)
        nonfinite += int((~finite).sum())
        if finite.any():
            i = int(np.argmin(np.where(finite, losses, np.inf)))
            if best is None or losses[i] < best[0]:
                best = (float(losses[i]), batch[i])
        gen_loss = float(losses[finite].min()) if finite.any() else math.nan
        top = best[0] if best else math.inf
        history.append(HistoryPoint("random_search", generation + 1, done, top, top, gen_loss, None))
    if best is None:
        raise EvomergeError("random_search: the objective returned no finite loss")
    loss, candidate = best
    stage = StageResult("random_search", candidate, loss, loss, done, len(history), reason)
    return SearchResult(
        method="random_search",
        candidate=candidate,
        loss=loss,
        fitness=loss,
        stop_reason=reason,
        evaluations=done,
        nonfinite_evaluations=nonfinite,
        stages=(stage,),
        history=tuple(history),
    )
