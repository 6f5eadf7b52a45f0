"""The provider-side merge of DESIGN 1.1 over a pool of LoRA adapters, fast enough for a search loop.

    A_m = sum_i beta_i * S(A_i, alpha_i)      B_m = sum_i beta_i * B_i      W = W0 + s * B_m @ A_m

for each adapted matrix. S is the engine's operator (`evomerge_sdk.engine._operators`): it keeps the
`operators.keep_count(alpha_i, A_i.size)` entries of largest magnitude, ties to the lower index. `PoolMerger`
computes every adapter's `magnitude_order` once, as ranks, so a candidate's masks are one comparison
(`rank < keep`) and the sums are two tensor contractions; the result equals `merge_lora` exactly up to
float summation order (a test pins it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._types import FloatArray
from ..engine._operators import check_coefficients, magnitude_order
from ..errors import ConfigError
from ._blas import single_threaded_blas
from .model import ModelWeights

__all__ = ["PoolMerger", "keep_counts_vector"]


def keep_counts_vector(alpha: FloatArray, size: int) -> NDArray[np.int64]:
    """`keep_count(alpha_i, size)` for every entry at once (a test pins it to the scalar operator)."""
    counts = np.clip(np.floor(alpha * size + 0.5), 1, size).astype(np.int64)
    counts[alpha == 0.0] = 0
    return counts


class PoolMerger:
    """Merges one fixed pool of adapters for many (alpha, beta) candidates.

    `a_stacks[j]` is (N, r, in_j) and `b_stacks[j]` is (N, out_j, r), for the matrices W1, W2, W3.
    """

    def __init__(
        self, base: ModelWeights, a_stacks: Sequence[FloatArray], b_stacks: Sequence[FloatArray], scale: float
    ) -> None:
        if len(a_stacks) != 3 or len(b_stacks) != 3:
            raise ConfigError("need A and B stacks for the three adapted matrices")
        self.base = base
        self.scale = float(scale)
        self.a = [np.asarray(a, dtype=np.float64) for a in a_stacks]
        self.b = [np.asarray(b, dtype=np.float64) for b in b_stacks]
        self.n = int(self.a[0].shape[0])
        if self.n < 1:
            raise ConfigError("a pool needs at least one adapter")
        for a, b, w in zip(self.a, self.b, base.matrices(), strict=True):
            if a.shape[0] != self.n or b.shape[0] != self.n:
                raise ConfigError("every stack must hold the same number of adapters")
            if (b.shape[1], a.shape[2]) != w.shape or a.shape[1] != b.shape[2]:
                raise ConfigError(f"LoRA shapes {a.shape[1:]} / {b.shape[1:]} do not fit a {w.shape} matrix")
        self.ranks = [self._ranks(a) for a in self.a]

    @staticmethod
    def _ranks(stack: FloatArray) -> NDArray[np.int32]:
        """Each entry's position in its adapter's `magnitude_order` (0 = largest magnitude)."""
        n = stack.shape[0]
        size = stack[0].size
        ranks = np.empty((n, size), dtype=np.int32)
        positions = np.arange(size, dtype=np.int32)
        for i in range(n):
            ranks[i, magnitude_order(stack[i])] = positions
        return ranks.reshape(stack.shape)

    def keep_counts(self, alpha: FloatArray) -> list[NDArray[np.int64]]:
        """Entries of each A_i that S keeps, per adapted matrix (`keep_counts_vector` of each size)."""
        return [keep_counts_vector(alpha, a[0].size) for a in self.a]

    def merged_pairs(self, alpha: ArrayLike, beta: ArrayLike) -> list[tuple[FloatArray, FloatArray]]:
        """(A_m, B_m) for each adapted matrix."""
        a, b = check_coefficients(alpha, beta, self.n)
        out = []
        with single_threaded_blas():
            for stack_a, stack_b, ranks, keep in zip(
                self.a, self.b, self.ranks, self.keep_counts(a), strict=True
            ):
                kept = np.where(ranks < keep[:, None, None], stack_a, 0.0)
                out.append((np.tensordot(b, kept, axes=1), np.tensordot(b, stack_b, axes=1)))
        return out

    def deltas(self, alpha: ArrayLike, beta: ArrayLike) -> list[FloatArray]:
        """The weight updates s * B_m @ A_m."""
        pairs = self.merged_pairs(alpha, beta)
        with single_threaded_blas():
            return [self.scale * (b_m @ a_m) for a_m, b_m in pairs]

    def merge(self, alpha: ArrayLike, beta: ArrayLike) -> ModelWeights:
        """The merged model W0 + s * B_m @ A_m."""
        return self.base.with_deltas(self.deltas(alpha, beta))
