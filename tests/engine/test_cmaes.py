"""CMA-ES: convergence, bounds, determinism, exact checkpoints, stop criteria and input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge_sdk.engine import CMA, BoxTransform, StopCriteria, StopReason, default_popsize
from evomerge_sdk.errors import ConfigError, UsageError


def sphere(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.sum(x**2, axis=-1)
    return out


def ellipsoid(x: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    out: np.ndarray = np.sum(10 ** (6 * np.arange(n) / (n - 1)) * x**2, axis=-1)
    return out


def rosenbrock(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.sum(100 * (x[..., 1:] - x[..., :-1] ** 2) ** 2 + (1 - x[..., :-1]) ** 2, axis=-1)
    return out


def run(es: CMA, f: object, generations: int) -> None:
    for _ in range(generations):
        es.tell(f(es.ask()))  # type: ignore[operator]


@pytest.mark.parametrize("diagonal", [False, True])
def test_reaches_the_target_on_an_ellipsoid(diagonal: bool) -> None:
    es = CMA(
        np.full(8, 1.0),
        0.5,
        seed=3,
        diagonal=diagonal,
        stop=StopCriteria(target=1e-10, max_evaluations=20000),
    )
    while es.stop() is None:
        es.tell(ellipsoid(es.ask()))
    assert es.stop() is StopReason.TARGET
    assert es.best_f <= 1e-10
    assert es.best_x is not None and np.abs(es.best_x).max() < 1e-4
    # Separable problem: sep-CMA needs fewer evaluations than the full matrix.
    assert es.evaluations < (4000 if diagonal else 8000)


def test_solves_rosenbrock() -> None:
    es = CMA(np.zeros(5), 0.5, seed=1, stop=StopCriteria(target=1e-10, max_evaluations=20000))
    while es.stop() is None:
        es.tell(rosenbrock(es.ask()))
    assert es.stop() is StopReason.TARGET
    assert es.best_x is not None
    np.testing.assert_allclose(es.best_x, np.ones(5), atol=1e-4)


def test_learns_the_inverse_hessian_shape() -> None:
    es = CMA(np.ones(4), 0.3, seed=2)
    scales = np.array([1.0, 10.0, 100.0, 1000.0])
    run(es, lambda x: np.sum((scales * x) ** 2, axis=-1), 250)
    c = es.covariance()
    ratio = np.sqrt(np.diag(c))[0] / np.sqrt(np.diag(c))[-1]
    assert 300 < ratio < 3000  # C ~ H^-1, so std ratio ~ 1000


def test_default_parameters_follow_the_tutorial() -> None:
    assert default_popsize(10) == 10 and default_popsize(100) == 17 and default_popsize(1) == 4
    es = CMA(np.zeros(10), 1.0)
    w = es._p.weights
    assert es.popsize == 10 and es._p.mu == 5
    assert np.all(w[:5] > 0) and math.isclose(w[:5].sum(), 1.0)
    assert np.all(w[5:] <= 0)
    # Active CMA with default popsize: negative weights cancel the decay, c1 + cmu * sum(w) == 0.
    assert math.isclose(es._p.c1 + es._p.cmu * w.sum(), 0.0, abs_tol=1e-12)


def test_deferred_covariance_update_equals_the_eager_one() -> None:
    # N = 150 decomposes every other generation, so updates are queued in between. Replaying each
    # generation's update eagerly (C <- decay C + sum w v v^T) must give the same matrix.
    es = CMA(np.ones(150), 0.5, seed=7)
    assert es._p.eigen_gap > 1
    eager = np.eye(150)
    updates: list[tuple[float, np.ndarray, np.ndarray]] = []
    original = es._queue

    def record(decay: float, vectors: np.ndarray, weights: np.ndarray) -> None:
        updates.append((decay, vectors.copy(), weights.copy()))
        original(decay, vectors, weights)

    es._queue = record  # type: ignore[method-assign]
    queued_seen = False
    for _ in range(25):
        es.tell(ellipsoid(es.ask()))
        decay, v, w = updates[-1]
        eager = decay * eager + (v.T * w) @ v
        queued_seen |= len(es._pending_vectors) > 1
        np.testing.assert_allclose(es.covariance(), eager, rtol=1e-10, atol=1e-14)
    assert queued_seen


@pytest.mark.parametrize("diagonal", [False, True])
def test_same_seed_same_run_other_seed_other_run(diagonal: bool) -> None:
    a, b, c = (CMA(np.zeros(6), 0.3, seed=s, diagonal=diagonal) for s in (5, 5, 6))
    for _ in range(15):
        xa, xb, xc = a.ask(), b.ask(), c.ask()
        assert np.array_equal(xa, xb)
        assert not np.array_equal(xa, xc)
        a.tell(sphere(xa))
        b.tell(sphere(xb))
        c.tell(sphere(xc))


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("pending_ask", [False, True])
def test_state_dict_round_trips_exactly(diagonal: bool, pending_ask: bool) -> None:
    es = CMA(np.full(25, 0.5), 0.2, lower=0.0, upper=1.0, popsize=9, seed=11, diagonal=diagonal)
    run(es, lambda x: sphere(x - 0.3), 13)
    if pending_ask:
        es.ask()
    restored = CMA.from_state(json.loads(json.dumps(es.state_dict(), allow_nan=False)))
    assert restored.state_dict() == es.state_dict()
    for _ in range(20):
        x1, x2 = es.ask(), restored.ask()
        assert np.array_equal(x1, x2)
        f = sphere(x1 - 0.3)
        es.tell(f)
        restored.tell(f)
    assert es.sigma == restored.sigma and np.array_equal(es.mean, restored.mean)
    assert es.best_f == restored.best_f


def test_from_state_refuses_foreign_or_damaged_state() -> None:
    es = CMA(np.zeros(3), 1.0)
    with pytest.raises(ConfigError, match="not a CMA state"):
        CMA.from_state({"format": "something-else"})
    state = es.state_dict()
    state["version"] = 99
    with pytest.raises(ConfigError, match="version"):
        CMA.from_state(state)
    state = es.state_dict()
    del state["ps"]
    with pytest.raises(ConfigError, match="damaged"):
        CMA.from_state(state)
    state = es.state_dict()
    state["n"] = 4
    with pytest.raises(ConfigError, match="shapes"):
        CMA.from_state(state)


def test_asking_twice_repeats_the_population() -> None:
    es = CMA(np.zeros(4), 1.0, seed=1)
    assert np.array_equal(es.ask(), es.ask())
    es.tell(np.arange(es.popsize, dtype=float))
    assert es.generation == 1 and es.evaluations == es.popsize


@settings(max_examples=40, deadline=None)
@given(
    lower=st.floats(-100, 100),
    width=st.floats(1e-3, 50),
    where=st.floats(0, 1),
    sigma=st.floats(1e-3, 100),
    seed=st.integers(0, 2**32),
)
def test_every_sample_lies_within_the_bounds(
    lower: float, width: float, where: float, sigma: float, seed: int
) -> None:
    upper = lower + width
    mean = np.full(3, min(upper, lower + where * width))
    es = CMA(mean, sigma, lower=lower, upper=upper, seed=seed)
    for _ in range(3):
        x = es.ask()
        assert np.all(x >= lower) and np.all(x <= upper)
        es.tell(sphere(x))
    assert np.all(es.mean >= lower) and np.all(es.mean <= upper)


def test_box_transform_is_the_identity_inside_and_folds_outside() -> None:
    box = BoxTransform(0.0, 1.0, 1)
    inside = np.linspace(0.05, 0.95, 19)[:, None]
    assert np.array_equal(box(inside), inside)
    far = np.linspace(-40, 40, 2001)[:, None]
    y = box(far)
    assert y.min() >= 0 and y.max() <= 1
    assert np.abs(np.diff(y[:, 0])).max() < 0.05  # continuous
    for y0 in (0.0, 0.01, 0.5, 0.97, 1.0):
        np.testing.assert_allclose(box(box.inverse(np.array([y0]))), [y0], atol=1e-12)


def test_one_sided_and_unbounded_coordinates() -> None:
    box = BoxTransform(np.array([0.0, -np.inf, -np.inf]), np.array([np.inf, 2.0, np.inf]), 3)
    x = np.array([[-5.0, 7.0, -1e9], [3.0, 1.0, 4.0]])
    y = box(x)
    assert y[0, 0] >= 0 and y[0, 1] <= 2 and y[0, 2] == -1e9
    assert np.array_equal(y[1], [3.0, 1.0, 4.0])


def test_a_minimum_on_the_bound_is_approached() -> None:
    # Paper-style start on the upper bound, optimum at the lower bound.
    es = CMA(np.ones(5), 0.05, lower=0.0, upper=1.0, seed=0, popsize=20)
    run(es, lambda x: np.sum(x, axis=-1), 150)
    assert es.best_f < 1e-3
    assert np.all(es.mean < 0.01)


def test_fitness_policy_nan_and_inf_rank_worst() -> None:
    es = CMA(np.zeros(3), 1.0, seed=0, popsize=6)
    x = es.ask()
    es.tell([np.nan, 5.0, np.inf, 1.0, np.nan, 3.0])
    assert es.best_f == 1.0
    assert es.best_x is not None and np.array_equal(es.best_x, x[3])
    # An all-NaN generation carries no information but does not break the run.
    es.ask()
    es.tell([np.nan] * 6)
    assert es.generation == 2 and es.best_f == 1.0
    assert np.all(np.isfinite(es.mean)) and math.isfinite(es.sigma)
    es.ask()
    with pytest.raises(ConfigError, match="-inf"):
        es.tell([0.0, 1.0, -np.inf, 2.0, 3.0, 4.0])


def test_bad_inputs_get_clear_errors() -> None:
    with pytest.raises(ConfigError, match="popsize"):
        CMA(np.zeros(3), 1.0, popsize=0)
    with pytest.raises(ConfigError, match="popsize"):
        CMA(np.zeros(3), 1.0, popsize=1)
    with pytest.raises(ConfigError, match="sigma"):
        CMA(np.zeros(3), 0.0)
    with pytest.raises(ConfigError, match="sigma"):
        CMA(np.zeros(3), float("nan"))
    with pytest.raises(ConfigError, match="lower bound must be < upper"):
        CMA(np.zeros(3), 1.0, lower=1.0, upper=1.0)
    with pytest.raises(ConfigError, match="lower bound must be < upper"):
        CMA(np.zeros(3), 1.0, lower=[0, 2, 0], upper=[1, 1, 1])
    with pytest.raises(ConfigError, match="3 entries"):
        CMA(np.zeros(3), 1.0, lower=[0, 0], upper=1.0)
    with pytest.raises(ConfigError, match="within the bounds"):
        CMA(np.full(3, 2.0), 1.0, lower=0.0, upper=1.0)
    with pytest.raises(ConfigError, match="non-empty vector"):
        CMA(np.zeros((2, 2)), 1.0)
    with pytest.raises(ConfigError, match="non-empty vector"):
        CMA([], 1.0)
    with pytest.raises(ConfigError, match="finite"):
        CMA([0.0, np.inf], 1.0)
    with pytest.raises(ConfigError, match="seed"):
        CMA(np.zeros(3), 1.0, seed=-1)
    with pytest.raises(ConfigError, match="max_evaluations"):
        StopCriteria(max_evaluations=-5)
    es = CMA(np.zeros(3), 1.0, popsize=5)
    with pytest.raises(UsageError, match="ask"):  # misuse, not a bad setting
        es.tell(np.zeros(5))
    es.ask()
    with pytest.raises(ConfigError, match="expects 5 values"):
        es.tell(np.zeros(4))
    with pytest.raises(ConfigError, match="real numbers"):
        es.tell([1.0, "low", 2.0, 3.0, 4.0])  # type: ignore[arg-type]


def test_max_evaluations_is_never_exceeded() -> None:
    es = CMA(np.zeros(3), 1.0, popsize=7, stop=StopCriteria(max_evaluations=50))
    while es.stop() is None:
        es.tell(sphere(es.ask()))
    assert es.stop() is StopReason.MAX_EVALUATIONS
    assert es.evaluations == 49


def test_tolx_and_tolfun_fire_on_convergence() -> None:
    es = CMA(np.ones(3), 1.0, seed=0, stop=StopCriteria(tolx=1e-6, tolfun=0))
    while es.stop() is None:
        es.tell(sphere(es.ask()))
    assert es.stop() is StopReason.TOLX
    es = CMA(np.ones(3), 1.0, seed=0, stop=StopCriteria(tolfun=1e-3, tolx=0))
    while es.stop() is None:
        es.ask()
        es.tell(np.full(es.popsize, 7.0))  # flat
    assert es.stop() is StopReason.TOLFUN
    assert es.generation == 10 + math.ceil(30 * 3 / es.popsize)


def test_condition_and_stagnation() -> None:
    es = CMA(np.ones(4), 1.0, seed=0, stop=StopCriteria(max_condition=1e4, tolx=0, tolfun=0))
    scales = np.array([1.0, 1.0, 1.0, 1e4])
    while es.stop() is None:
        es.tell(sphere(scales * es.ask()))
    assert es.stop() is StopReason.CONDITION and es.condition_number > 1e4
    rng = np.random.default_rng(0)
    es = CMA(np.zeros(2), 1.0, seed=0, stop=StopCriteria(tolx=0, tolfun=0, max_evaluations=100_000))
    while es.stop() is None:
        es.ask()
        es.tell(rng.random(es.popsize))  # pure noise: no progress to make
    assert es.stop() is StopReason.STAGNATION
