"""White-box Task Arithmetic, TIES and DARE on the embedded repository."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge_sdk.errors import ConfigError
from evomerge_sdk.local import whitebox
from evomerge_sdk.local.repository import Repository


@pytest.fixture(scope="module")
def vectors(repo: Repository) -> whitebox.TaskVectors:
    return whitebox.TaskVectors(repo, list(repo.adapter_names[:6]))


def test_task_arithmetic_adds_dense_task_vectors(repo: Repository, vectors: whitebox.TaskVectors) -> None:
    merged = whitebox.task_arithmetic(vectors, 0.3)
    for k, w0 in enumerate(repo.base.matrices()):
        want = w0 + 0.3 * sum(repo.lora(n).deltas()[k] for n in vectors.names)
        np.testing.assert_allclose(merged.matrices()[k], want, rtol=1e-12, atol=1e-12)


def test_ties_by_hand() -> None:
    tau = np.array([[1.0, -2.0, 0.5, 3.0], [-1.0, 1.5, 0.2, 2.0]])
    # keep 2 of 4 per row: [0, -2, 0, 3] and [0, 1.5, 0, 2]; signs of the sum: [0, -, 0, +]
    # entry 1: only -2 agrees -> -2; entry 3: both agree -> 2.5
    np.testing.assert_allclose(whitebox.ties_vector(tau, 0.5), [0.0, -2.0, 0.0, 2.5])
    np.testing.assert_allclose(whitebox.ties_vector(tau, 1.0), [0.0, -2.0, 0.35, 2.5])


def test_dare_is_unbiased_and_exact_without_drops(vectors: whitebox.TaskVectors) -> None:
    total = vectors.tau.sum(axis=0)
    np.testing.assert_array_equal(whitebox.dare_vector(vectors.tau, 0.0, seed=1), total)
    mean = np.mean([whitebox.dare_vector(vectors.tau, 0.5, seed=s) for s in range(400)], axis=0)
    scale = np.abs(vectors.tau).sum(axis=0).max()
    assert np.abs(mean - total).max() < 0.2 * scale
    assert np.array_equal(
        whitebox.dare_vector(vectors.tau, 0.5, 3), whitebox.dare_vector(vectors.tau, 0.5, 3)
    )


def test_tune_picks_the_lowest_validation_loss(repo: Repository, vectors: whitebox.TaskVectors) -> None:
    target = repo.targets()[0]
    grid = [{"density": d, "lam": v} for d in (0.2, 0.5) for v in (0.5, 1.0)]
    tuned = whitebox.tune(vectors, "ties", target.validation, grid)
    losses = [repo.evaluate(whitebox.ties(vectors, **p), target.validation).loss for p in grid]
    assert tuned.validation.loss == min(losses)
    assert tuned.params == grid[int(np.argmin(losses))]


def test_default_grids_reach_one_over_n() -> None:
    for method in ("task_arithmetic", "dare"):
        lams = {p["lam"] for p in whitebox.default_grid(method, 100)}
        assert 0.01 in lams and 1.0 in lams


def test_bad_input(vectors: whitebox.TaskVectors, repo: Repository) -> None:
    with pytest.raises(ConfigError, match="density"):
        whitebox.ties(vectors, 0.0, 1.0)
    with pytest.raises(ConfigError, match="drop"):
        whitebox.dare(vectors, 1.0, 1.0)
    with pytest.raises(ConfigError, match="lambda"):
        whitebox.task_arithmetic(vectors, float("nan"))
    with pytest.raises(ConfigError, match="unknown method"):
        whitebox.tune(vectors, "breadcrumbs", repo.targets()[0].validation)
    with pytest.raises(ConfigError, match="empty"):
        whitebox.tune(vectors, "ties", repo.targets()[0].validation, grid=[])
    with pytest.raises(ConfigError, match="unknown adapter"):
        whitebox.TaskVectors(repo, ["nope"])
