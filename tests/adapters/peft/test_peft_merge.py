"""The torch merge operator agrees with the SDK's numpy operator on shared test vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evomerge_peft import merge_module
from evomerge_peft._pool import _order_ranks

from evomerge_sdk.engine import merge_lora, sparsify


def _vectors(seed: int, ties: bool) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Shared test vectors: N pairs, alphas including 0, 1 and fractions, betas of both signs."""
    rng = np.random.default_rng(seed)
    n, r, d_in, d_out = 5, 3, 7, 6
    if ties:  # few distinct magnitudes, so the tie rule (lower index first) decides
        a = [rng.integers(-2, 3, (r, d_in)).astype(np.float64) for _ in range(n)]
    else:
        a = [rng.standard_normal((r, d_in)) for _ in range(n)]
    b = [rng.standard_normal((d_out, r)) for _ in range(n)]
    alpha = np.array([0.0, 1.0, 0.33, 0.5, 0.04])
    beta = np.array([0.7, -1.2, 0.3, 1.5, -0.4])
    return a, b, alpha, beta


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paper_form_matches_numpy(ties: bool, dtype: torch.dtype) -> None:
    for seed in range(5):
        a, b, alpha, beta = _vectors(seed, ties)
        want_a, want_b = merge_lora(a, b, alpha, beta)
        stack_a = torch.tensor(np.stack(a), dtype=dtype)
        got_a, got_b = merge_module(stack_a, torch.tensor(np.stack(b), dtype=dtype), _order_ranks(stack_a),
                                    alpha, beta)  # fmt: skip
        assert np.abs(got_a.double().numpy() - want_a).max() < 1e-6
        assert np.abs(got_b.double().numpy() - want_b).max() < 1e-6


def test_cat_form_is_the_sum_without_cross_terms() -> None:
    a, b, alpha, beta = _vectors(3, ties=False)
    stack_a = torch.tensor(np.stack(a))
    got_a, got_b = merge_module(stack_a, torch.tensor(np.stack(b)), _order_ranks(stack_a), alpha, beta, "cat")
    assert got_a.shape == (5 * 3, 7) and got_b.shape == (6, 5 * 3)
    want = sum(be * bi @ sparsify(ai, al) for ai, bi, al, be in zip(a, b, alpha, beta, strict=True))
    assert np.abs((got_b @ got_a).numpy() - want).max() < 1e-12


def test_bad_vectors_are_refused() -> None:
    from evomerge_sdk.errors import ConfigError

    a, b, alpha, beta = _vectors(0, ties=False)
    stack_a = torch.tensor(np.stack(a))
    with pytest.raises(ConfigError, match="alpha"):
        merge_module(stack_a, torch.tensor(np.stack(b)), _order_ranks(stack_a), alpha * 2, beta)
    with pytest.raises(ValueError, match="merge form"):
        merge_module(stack_a, torch.tensor(np.stack(b)), _order_ranks(stack_a), alpha, beta, "sum")  # type: ignore[arg-type]
