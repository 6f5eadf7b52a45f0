"""One home for the array aliases of type annotations (numpy dtypes the SDK computes in)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["Float32Array", "FloatArray", "IndexArray", "IntArray"]

FloatArray = NDArray[np.float64]
"""Losses, coefficients, scores: float64 everywhere the search reads them."""
IntArray = NDArray[np.int64]
"""Token ids, labels, example indices."""
Float32Array = NDArray[np.float32]
"""The embedded model's weights and activations (float32 for speed)."""
IndexArray = NDArray[np.intp]
"""Positions from numpy's own index functions (argsort, flatnonzero)."""
