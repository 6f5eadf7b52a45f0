"""The merge operators of Evo-Merging as pure numpy functions.

`sparsify` is the sparsity-based denoising operator S(X, k) of DESIGN 1.1; `merge_lora` applies it
asymmetrically (to A only) together with sign-aware scaling; `merge_outputs` is the output-space merge of
DESIGN 1.2. Nothing here keeps state, so every function can be pinned by property tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._types import FloatArray
from ..errors import ConfigError

__all__ = [
    "check_coefficients",
    "keep_count",
    "magnitude_order",
    "merge_lora",
    "merge_outputs",
    "scale_sum",
    "sparsify",
]


def _check_keep(keep: float) -> float:
    keep = float(keep)
    if not 0.0 <= keep <= 1.0:
        raise ConfigError(f"keep fraction must be in [0, 1], got {keep!r}")
    return keep


def keep_count(keep: float, size: int) -> int:
    """How many of `size` entries S keeps: round(keep * size), half up, at least 1 when keep > 0."""
    keep = _check_keep(keep)
    if keep == 0.0 or size == 0:
        return 0
    return int(min(size, max(1, np.floor(keep * size + 0.5))))


def magnitude_order(x: ArrayLike, axis: int | None = None) -> NDArray[np.intp]:
    """Indices that sort `x` by decreasing magnitude; ties go to the lower index.

    The order does not depend on the keep fraction, so callers that sparsify the same array at many
    fractions (every candidate of a search) compute it once.
    """
    a = np.abs(np.asarray(x, dtype=np.float64))
    if axis is None:
        return np.argsort(-a.ravel(), kind="stable")
    return np.argsort(-a, axis=axis, kind="stable")


def sparsify(
    x: ArrayLike, keep: float, axis: int | None = None, order: NDArray[np.intp] | None = None
) -> FloatArray:
    """S(x, keep): keep the round(keep * size) largest-magnitude entries of `x`, zero the rest.

    With `axis=None` the whole array competes; with an axis, each slice along it is sparsified on its
    own (the output-space merge sparsifies each example's score vector separately). `order` may pass a
    precomputed `magnitude_order(x, axis)`.
    """
    arr = np.asarray(x, dtype=np.float64)
    if order is None:
        order = magnitude_order(arr, axis)
    if axis is None:
        k = keep_count(keep, arr.size)
        flat = np.zeros(arr.size)
        top = order[:k]
        flat[top] = arr.ravel()[top]
        return flat.reshape(arr.shape)
    axis = axis % arr.ndim
    k = keep_count(keep, arr.shape[axis])
    top = np.take(order, np.arange(k), axis=axis)
    out = np.zeros_like(arr)
    np.put_along_axis(out, top, np.take_along_axis(arr, top, axis=axis), axis=axis)
    return out


def check_coefficients(alpha: ArrayLike, beta: ArrayLike, n: int) -> tuple[FloatArray, FloatArray]:
    """alpha and beta as float vectors of length n; ConfigError unless finite and alpha in [0, 1]."""
    try:
        a = np.asarray(alpha, dtype=np.float64)
        b = np.asarray(beta, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"alpha and beta must be numeric vectors: {exc}") from None
    if a.shape != (n,) or b.shape != (n,):
        raise ConfigError(f"alpha and beta must each have {n} entries, got shapes {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ConfigError("alpha and beta must be finite")
    if np.any(a < 0.0) or np.any(a > 1.0):
        raise ConfigError(f"alpha entries must lie in [0, 1], got {a.min()}..{a.max()}")
    return a, b


def scale_sum(xs: Sequence[ArrayLike], beta: ArrayLike) -> FloatArray:
    """Sign-aware scaling: sum_i beta_i * x_i, where a negative beta_i subtracts model i."""
    b = np.asarray(beta, dtype=np.float64)
    if b.shape != (len(xs),):
        raise ConfigError(f"beta must have {len(xs)} entries, got shape {b.shape}")
    stacked = np.stack([np.asarray(x, dtype=np.float64) for x in xs])
    out: FloatArray = np.tensordot(b, stacked, axes=1)
    return out


def merge_lora(
    a_mats: Sequence[ArrayLike], b_mats: Sequence[ArrayLike], alpha: ArrayLike, beta: ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """The merged LoRA pair of DESIGN 1.1: A_m = sum beta_i S(A_i, alpha_i), B_m = sum beta_i B_i.

    Only A is sparsified (asymmetric sparsification); the weight update is then s * B_m @ A_m.
    """
    if len(a_mats) != len(b_mats):
        raise ConfigError(f"got {len(a_mats)} A matrices but {len(b_mats)} B matrices")
    a, b = check_coefficients(alpha, beta, len(a_mats))
    a_m = scale_sum([sparsify(x, k) for x, k in zip(a_mats, a, strict=True)], b)
    b_m = scale_sum(b_mats, b)
    return a_m, b_m


def merge_outputs(reference: ArrayLike, scores: ArrayLike, alpha: ArrayLike, beta: ArrayLike) -> FloatArray:
    """The output-space merge of DESIGN 1.2: z_m = z_r + sum_i beta_i S(z_i - z_r, alpha_i).

    `scores` has shape (models, ..., options) and `reference` shape (..., options); each score vector
    over the options is sparsified on its own, so a merged answer for one example needs only that
    example's scores.
    """
    z = np.asarray(scores, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if z.shape[1:] != r.shape:
        raise ConfigError(f"scores of shape {z.shape} do not match reference of shape {r.shape}")
    a, b = check_coefficients(alpha, beta, z.shape[0])
    merged: FloatArray = r.copy()
    for i in range(z.shape[0]):
        if a[i] == 0.0 or b[i] == 0.0:
            continue
        merged += b[i] * sparsify(z[i] - r, a[i], axis=-1)
    return merged
