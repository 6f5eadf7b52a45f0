"""Pins the semantics of the merge operators (DESIGN 1.1 and 1.2)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from evomerge_sdk.engine import (
    keep_count,
    magnitude_order,
    merge_lora,
    merge_outputs,
    scale_sum,
    sparsify,
)
from evomerge_sdk.errors import ConfigError

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
arrays = hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), elements=finite)
# Few distinct values, so ties are common.
tied_arrays = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=1, max_dims=2, max_side=8),
    elements=st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0]),
)
keeps = st.floats(0.0, 1.0)


def test_keep_count_rounds_half_up_and_keeps_at_least_one() -> None:
    assert keep_count(0.5, 3) == 2  # 1.5 rounds up
    assert keep_count(0.25, 2) == 1  # 0.5 rounds up
    assert keep_count(0.2, 10) == 2
    assert keep_count(1e-9, 5) == 1  # keep > 0 keeps at least one
    assert keep_count(0.0, 5) == 0
    assert keep_count(1.0, 7) == 7
    assert keep_count(0.7, 0) == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_keep_outside_unit_interval_is_rejected(bad: float) -> None:
    with pytest.raises(ConfigError, match="keep fraction"):
        sparsify(np.ones(3), bad)


@settings(max_examples=200, deadline=None)
@given(x=arrays, keep=keeps)
def test_sparsify_keeps_the_largest_magnitudes(x: np.ndarray, keep: float) -> None:
    out = sparsify(x, keep)
    k = keep_count(keep, x.size)
    kept = np.flatnonzero(out.ravel() != 0)
    # Kept entries are unchanged; everything else is zero.
    assert np.array_equal(out.ravel()[kept], x.ravel()[kept])
    order = np.argsort(-np.abs(x.ravel()), kind="stable")
    expected = np.zeros(x.size)
    expected[order[:k]] = x.ravel()[order[:k]]
    assert np.array_equal(out.ravel(), expected)
    assert out.shape == x.shape
    if k < x.size and k > 0:
        assert np.abs(x.ravel()[order[:k]]).min() >= np.abs(x.ravel()[order[k:]]).max()


@settings(max_examples=100, deadline=None)
@given(x=tied_arrays, keep=keeps)
def test_sparsify_breaks_ties_towards_the_lower_index(x: np.ndarray, keep: float) -> None:
    flat = x.ravel()
    k = keep_count(keep, flat.size)
    kept = magnitude_order(flat)[:k]
    # Among entries of equal magnitude, the kept ones all come before the dropped ones.
    for m in np.unique(np.abs(flat)):
        idx = np.flatnonzero(np.abs(flat) == m)
        chosen = np.isin(idx, kept)
        assert np.all(np.diff(chosen.astype(int)) <= 0)
    assert np.array_equal(sparsify(x, keep), sparsify(x.copy(), keep))


def test_sparsify_edge_fractions() -> None:
    x = np.array([[3.0, -4.0], [0.5, 1.0]])
    assert np.array_equal(sparsify(x, 0.0), np.zeros_like(x))
    assert np.array_equal(sparsify(x, 1.0), x)
    assert np.array_equal(sparsify(x, 1e-6), np.array([[0.0, -4.0], [0.0, 0.0]]))
    assert np.array_equal(sparsify(x, 0.5), np.array([[3.0, -4.0], [0.0, 0.0]]))


@settings(max_examples=100, deadline=None)
@given(x=hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 7)), elements=finite), keep=keeps)
def test_sparsify_along_an_axis_treats_each_slice_alone(x: np.ndarray, keep: float) -> None:
    out = sparsify(x, keep, axis=-1)
    for row_in, row_out in zip(x, out, strict=True):
        assert np.array_equal(row_out, sparsify(row_in, keep))
    assert np.array_equal(out, sparsify(x, keep, axis=-1, order=magnitude_order(x, axis=-1)))


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 4),
    shape_a=st.tuples(st.integers(1, 3), st.integers(1, 5)),
    out_dim=st.integers(1, 4),
)
def test_merge_lora_matches_the_design_formula(
    data: st.DataObject, n: int, shape_a: tuple[int, int], out_dim: int
) -> None:
    a_mats = [data.draw(hnp.arrays(np.float64, shape_a, elements=finite)) for _ in range(n)]
    b_mats = [data.draw(hnp.arrays(np.float64, (out_dim, shape_a[0]), elements=finite)) for _ in range(n)]
    alpha = np.array(data.draw(st.lists(keeps, min_size=n, max_size=n)))
    beta = np.array(data.draw(st.lists(st.floats(-1.5, 1.5), min_size=n, max_size=n)))
    a_m, b_m = merge_lora(a_mats, b_mats, alpha, beta)
    expect_a = sum(beta[i] * sparsify(a_mats[i], alpha[i]) for i in range(n))
    expect_b = sum(beta[i] * b_mats[i] for i in range(n))
    np.testing.assert_allclose(a_m, expect_a, rtol=1e-12, atol=1e-6)
    np.testing.assert_allclose(b_m, expect_b, rtol=1e-12, atol=1e-6)


def test_merge_lora_sparsifies_a_never_b() -> None:
    rng = np.random.default_rng(0)
    a_mats = [rng.standard_normal((2, 6)) for _ in range(3)]
    b_mats = [rng.standard_normal((4, 2)) for _ in range(3)]
    beta = np.array([0.5, -1.0, 2.0])
    a_m, b_m = merge_lora(a_mats, b_mats, np.zeros(3), beta)
    assert np.array_equal(a_m, np.zeros((2, 6)))  # alpha = 0 empties every A
    np.testing.assert_allclose(b_m, 0.5 * b_mats[0] - b_mats[1] + 2 * b_mats[2])  # B untouched
    a_half, _ = merge_lora(a_mats, b_mats, np.full(3, 0.5), np.array([1.0, 0.0, 0.0]))
    assert np.count_nonzero(a_half) == 6  # half of A_0's 12 entries


def test_sign_aware_scaling_subtracts_a_model() -> None:
    a = np.arange(6.0).reshape(2, 3)
    b = np.ones((3, 2))
    a_m, b_m = merge_lora([a, a], [b, b], np.ones(2), np.array([1.0, -1.0]))
    assert not a_m.any() and not b_m.any()
    np.testing.assert_allclose(scale_sum([a, 2 * a], np.array([2.0, -1.0])), np.zeros_like(a))


def test_merge_lora_rejects_mismatched_inputs() -> None:
    a, b = np.ones((2, 2)), np.ones((2, 2))
    with pytest.raises(ConfigError, match="A matrices"):
        merge_lora([a, a], [b], np.ones(2), np.ones(2))
    with pytest.raises(ConfigError, match="2 entries"):
        merge_lora([a, a], [b, b], np.ones(3), np.ones(2))
    with pytest.raises(ConfigError, match="finite"):
        merge_lora([a, a], [b, b], np.array([1.0, np.nan]), np.ones(2))
    with pytest.raises(ConfigError, match="beta"):
        scale_sum([a, a], np.ones(3))


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 4), examples=st.integers(1, 4), options=st.integers(1, 6))
def test_merge_outputs_matches_the_design_formula(
    data: st.DataObject, n: int, examples: int, options: int
) -> None:
    ref = data.draw(hnp.arrays(np.float64, (examples, options), elements=st.floats(-10, 10)))
    scores = data.draw(hnp.arrays(np.float64, (n, examples, options), elements=st.floats(-10, 10)))
    alpha = np.array(data.draw(st.lists(keeps, min_size=n, max_size=n)))
    beta = np.array(data.draw(st.lists(st.floats(-1.5, 1.5), min_size=n, max_size=n)))
    merged = merge_outputs(ref, scores, alpha, beta)
    expected = ref.copy()
    for i in range(n):
        for e in range(examples):
            expected[e] += beta[i] * sparsify(scores[i, e] - ref[e], alpha[i])
    np.testing.assert_allclose(merged, expected, rtol=1e-12, atol=1e-9)


def test_merge_outputs_never_reads_a_dropped_model() -> None:
    # A model with alpha = 0 or beta = 0 is never queried, so its scores may be missing (NaN).
    ref = np.zeros((2, 3))
    scores = np.stack([np.ones((2, 3)), np.full((2, 3), np.nan), np.full((2, 3), np.nan)])
    merged = merge_outputs(ref, scores, np.array([1.0, 0.0, 0.7]), np.array([0.5, 1.0, 0.0]))
    assert np.array_equal(merged, np.full((2, 3), 0.5))


def test_merge_outputs_checks_shapes() -> None:
    with pytest.raises(ConfigError, match="do not match"):
        merge_outputs(np.zeros((2, 3)), np.zeros((1, 2, 4)), np.ones(1), np.ones(1))
    with pytest.raises(ConfigError, match="1 entries"):
        merge_outputs(np.zeros((2, 3)), np.zeros((1, 2, 3)), np.ones(2), np.ones(1))
