"""The merge operator of DESIGN 1.1 in torch, in the paper's form and in the concatenation form.

paper (default):  A_m = sum_i beta_i S(A_i, alpha_i),  B_m = sum_i beta_i B_i        (rank r)
cat:              A_m = [beta_1 S(A_1, alpha_1); ...; beta_N S(A_N, alpha_N)],
                  B_m = [B_1, ..., B_N]                                              (rank N*r)

The paper's form multiplies out to sum_ij beta_i beta_j B_i S(A_j): the diagonal scales each adapter by
beta_i^2 and the cross terms B_i S(A_j) mix adapters whose A's were trained apart (near noise when each
A started from its own seed). The cat form is exactly sum_i beta_i B_i S(A_i): linear in beta, no cross
terms, at N times the rank. S is the engine's operator: keep the `keep_count(alpha_i, size)` entries of
A_i with the largest magnitude, ties to the lower index. With the magnitude order precomputed as ranks,
a candidate's masks are one comparison, so a merge is two contractions per module.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from evomerge_sdk.engine import keep_count
from evomerge_sdk.errors import ConfigError

__all__ = ["MERGE_FORMS", "MergeForm", "keep_counts", "merge_module"]

MergeForm = Literal["paper", "cat"]
MERGE_FORMS = ("paper", "cat")


def keep_counts(alpha: ArrayLike, size: int) -> list[int]:
    """How many entries of each A_i (of `size` entries) S keeps: the engine's `keep_count`."""
    return [keep_count(float(k), size) for k in np.asarray(alpha, dtype=np.float64)]


def _coefficients(
    alpha: ArrayLike, beta: ArrayLike, n: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """alpha and beta as float vectors of n entries: finite, alpha in [0, 1]; ConfigError otherwise."""
    try:
        a = np.asarray(alpha, dtype=np.float64)
        b = np.asarray(beta, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"alpha and beta must be numeric vectors: {exc}") from None
    if a.shape != (n,) or b.shape != (n,):
        raise ConfigError(f"alpha and beta must each have {n} entries, got shapes {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ConfigError("alpha and beta must be finite")
    if (a < 0).any() or (a > 1).any():
        raise ConfigError(f"alpha entries are kept fractions in [0, 1], got {a.min()}..{a.max()}")
    return a, b


def merge_module(
    a: torch.Tensor,
    b: torch.Tensor,
    order_ranks: torch.Tensor,
    alpha: ArrayLike,
    beta: ArrayLike,
    form: MergeForm = "paper",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_m, B_m) of one module from the stacks a (N, r, in), b (N, out, r) and magnitude ranks (N, r*in)."""
    n, r, d_in = a.shape
    al, be = _coefficients(alpha, beta, n)
    keep = torch.tensor(keep_counts(al, r * d_in), device=a.device, dtype=order_ranks.dtype)
    coef = torch.tensor(be, device=a.device, dtype=a.dtype)
    mask = order_ranks < keep[:, None]  # (N, r*in): S's kept entries
    kept = a.reshape(n, -1) * mask
    if form == "paper":
        a_m = (coef @ kept).reshape(r, d_in)
        b_m = torch.tensordot(coef, b, dims=1)
        return a_m, b_m
    if form == "cat":
        a_m = (kept * coef[:, None]).reshape(n * r, d_in)
        b_m = b.permute(1, 0, 2).reshape(b.shape[1], n * r)
        return a_m, b_m
    raise ValueError(f"merge form must be one of {MERGE_FORMS}, got {form!r}")
