"""White-box reference merges on the embedded repository: Task Arithmetic, TIES, DARE.

Here the weights are visible, so these baselines merge *task vectors* the standard way: adapter i's
task vector is its dense weight update tau_i = s * B_i @ A_i (on W1, W2, W3), and

* Task Arithmetic (Ilharco et al., 2023): W0 + lambda * sum_i tau_i;
* TIES (Yadav et al., 2023): keep each tau_i's top `density` fraction by magnitude, elect each entry's
  sign by the sign of the trimmed sum, average the entries that agree with it, scale by lambda;
* DARE (Yu et al., 2024): drop each entry of each tau_i with probability p, rescale the rest by
  1 / (1 - p), then Task Arithmetic.

Summing dense task vectors has no cross terms B_i A_j, unlike the black-box merge of DESIGN 1.1, so Task
Arithmetic here scales as N * lambda: the default grids include lambda near 1/N. `tune` picks each
method's hyper-parameters by validation loss, the signal a black-box search gets too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

from .._types import FloatArray
from ..errors import ConfigError
from ..objectives.metrics import Metrics
from .model import ModelWeights
from .repository import Repository
from .tasks import Examples

__all__ = [
    "TaskVectors",
    "Tuned",
    "dare",
    "dare_vector",
    "default_grid",
    "task_arithmetic",
    "ties",
    "ties_vector",
    "tune",
]


class TaskVectors:
    """The dense task vectors of a pool, flattened per adapter: tau has shape (N, total entries)."""

    def __init__(self, repository: Repository, names: Sequence[str]) -> None:
        if isinstance(names, str) or len(names) == 0:
            raise ConfigError("a pool is a non-empty sequence of adapter names")
        self.repository = repository
        self.names = tuple(names)
        rows = [np.concatenate([d.ravel() for d in repository.lora(n).deltas()]) for n in self.names]
        self.tau = np.stack(rows)
        self.shapes = [w.shape for w in repository.base.matrices()]

    @property
    def n(self) -> int:
        """Number of adapters."""
        return len(self.names)

    def apply(self, merged: FloatArray) -> ModelWeights:
        """The base plus a merged flat task vector."""
        deltas, start = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape))
            deltas.append(merged[start : start + size].reshape(shape))
            start += size
        return self.repository.base.with_deltas(deltas)


def _check_unit(name: str, value: float, *, closed_low: bool = True, closed_high: bool = True) -> float:
    v = float(value)
    low_ok = v >= 0.0 if closed_low else v > 0.0
    high_ok = v <= 1.0 if closed_high else v < 1.0
    if not (np.isfinite(v) and low_ok and high_ok):
        raise ConfigError(
            f"{name} must lie in {'[' if closed_low else '('}0, 1{']' if closed_high else ')'}, got {v!r}"
        )
    return v


def _check_lambda(lam: float) -> float:
    v = float(lam)
    if not np.isfinite(v):
        raise ConfigError(f"lambda must be finite, got {lam!r}")
    return v


def task_arithmetic(vectors: TaskVectors, lam: float) -> ModelWeights:
    """W0 + lambda * sum_i tau_i."""
    return vectors.apply(_check_lambda(lam) * vectors.tau.sum(axis=0))


def ties_vector(tau: FloatArray, density: float) -> FloatArray:
    """TIES on flat task vectors (rows): trim each to `density` by magnitude, elect signs, disjoint mean."""
    density = _check_unit("density", density, closed_low=False)
    k = max(1, int(np.floor(density * tau.shape[1] + 0.5)))
    threshold = -np.partition(-np.abs(tau), k - 1, axis=1)[:, k - 1 : k]
    trimmed = np.where(np.abs(tau) >= threshold, tau, 0.0)
    sign = np.sign(trimmed.sum(axis=0))
    agree = (np.sign(trimmed) == sign) & (trimmed != 0.0)
    count = agree.sum(axis=0)
    merged: FloatArray = np.where(count > 0, (trimmed * agree).sum(axis=0) / np.maximum(count, 1), 0.0)
    return merged


def dare_vector(tau: FloatArray, drop: float, seed: int) -> FloatArray:
    """DARE on flat task vectors (rows): drop entries with probability `drop`, rescale, sum."""
    drop = _check_unit("drop", drop, closed_high=False)
    keep = np.random.default_rng(seed).random(tau.shape) >= drop
    merged: FloatArray = (tau * keep).sum(axis=0) / (1.0 - drop)
    return merged


def ties(vectors: TaskVectors, density: float, lam: float) -> ModelWeights:
    """TIES-merging: trim to `density`, elect signs, disjoint mean, scale by lambda."""
    return vectors.apply(_check_lambda(lam) * ties_vector(vectors.tau, density))


def dare(vectors: TaskVectors, drop: float, lam: float, seed: int = 0) -> ModelWeights:
    """DARE: drop entries with probability `drop`, rescale by 1 / (1 - drop), then Task Arithmetic."""
    return vectors.apply(_check_lambda(lam) * dare_vector(vectors.tau, drop, seed))


def default_grid(method: str, n: int) -> list[dict[str, float]]:
    """The hyper-parameter grid `tune` searches for `method` on a pool of n adapters."""
    if n < 1:
        raise ConfigError(f"pool size must be >= 1, got {n}")
    lambdas = sorted({*(k / n for k in (0.25, 0.5, 1.0, 2.0, 4.0)), 0.1, 0.2, 0.3, 0.5, 0.7, 1.0})
    if method == "task_arithmetic":
        return [{"lam": v} for v in lambdas]
    if method == "ties":
        return [{"density": d, "lam": v} for d in (0.1, 0.2, 0.5) for v in (0.3, 0.5, 0.7, 1.0, 1.5, 2.0)]
    if method == "dare":
        return [{"drop": p, "lam": v} for p in (0.5, 0.9) for v in lambdas]
    raise ConfigError(f"unknown method {method!r}; choose task_arithmetic, ties or dare")


@attrs.frozen(eq=False)
class Tuned:
    """A white-box merge tuned on validation: method, chosen hyper-parameters, weights, validation metrics."""

    method: str
    params: dict[str, float]
    weights: ModelWeights
    validation: Metrics


_METHODS: dict[str, Callable[..., ModelWeights]] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
}


def tune(
    vectors: TaskVectors,
    method: str,
    validation: Examples,
    grid: Sequence[dict[str, float]] | None = None,
    seed: int = 0,
) -> Tuned:
    """The grid point of `method` with the lowest validation loss (DARE draws its masks from `seed`)."""
    if method not in _METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(_METHODS)}")
    points = default_grid(method, vectors.n) if grid is None else list(grid)
    if not points:
        raise ConfigError("the grid must not be empty")
    best: Tuned | None = None
    for params in points:
        kwargs: dict[str, Any] = dict(params)
        if method == "dare":
            kwargs["seed"] = seed
        weights = _METHODS[method](vectors, **kwargs)
        metrics = vectors.repository.evaluate(weights, validation)
        if best is None or metrics.loss < best.validation.loss:
            best = Tuned(method, dict(params), weights, metrics)
    assert best is not None
    return best
