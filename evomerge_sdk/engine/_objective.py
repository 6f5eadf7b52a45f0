"""The contract between the search and whatever scores a merge: candidates in, losses out.

The engine never talks to a network. An objective is any async callable
`objective(candidates, context) -> losses`: the provider-side merge (one service call per candidate) and
the output-space merge (cached scores) both fit. The search hands over a whole generation in one call,
so the objective decides how to fan out (through the scheduler, concurrently). It returns the raw loss;
the search adds its own L1 penalty.

`EvaluationContext` says which split to score (the validation split drives the search, the held-out
split only decides early stopping) and which generation asks, with a seed derived from the search seed,
so a later minibatch objective can draw the same minibatch for a whole generation (common random numbers)
and draw it again identically after a resume.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._checks import is_int
from .._types import FloatArray
from .._validators import must
from ..errors import ConfigError

__all__ = ["Candidate", "EvaluationContext", "Objective", "Split"]


def _frozen_vector(value: ArrayLike) -> FloatArray:
    try:
        arr = np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"merge coefficients must be numbers: {exc}") from None
    if arr.ndim != 1:
        raise ConfigError(f"merge coefficients must be a vector, got shape {arr.shape}")
    arr.setflags(write=False)
    return arr


@attrs.frozen(eq=False)
class Candidate:
    """One merge to score: alpha (kept fraction per model) and beta (signed scale per model).

    The arrays are read-only float64 copies; equality and hashing compare their exact values, so a
    candidate can key a cache.
    """

    alpha: FloatArray = attrs.field(converter=_frozen_vector)
    beta: FloatArray = attrs.field(converter=_frozen_vector)

    def __attrs_post_init__(self) -> None:
        """Cross-field: one alpha and one beta per model (checked first: the other messages assume it)."""
        if self.alpha.shape != self.beta.shape:
            raise ConfigError(f"alpha has {self.alpha.size} entries but beta has {self.beta.size}")
        if self.alpha.size == 0:
            raise ConfigError("a candidate needs at least one model")
        if not (np.all(np.isfinite(self.alpha)) and np.all(np.isfinite(self.beta))):
            raise ConfigError("alpha and beta must be finite")

    @property
    def n(self) -> int:
        """Number of models."""
        return int(self.alpha.size)

    def key(self) -> bytes:
        """The exact values as bytes, for caches and equality."""
        return self.alpha.tobytes() + self.beta.tobytes()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Candidate):
            return NotImplemented
        return self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (floats round-trip exactly)."""
        return {"alpha": self.alpha.tolist(), "beta": self.beta.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        """The inverse of `to_dict`."""
        return cls(alpha=data["alpha"], beta=data["beta"])


class Split(str, enum.Enum):
    """Which labelled data a loss is computed on."""

    VALIDATION = "validation"
    HELD_OUT = "held_out"


@attrs.frozen
class EvaluationContext:
    """Why a batch of candidates is scored.

    `stage` names the search stage (or baseline), `generation` counts generations over the whole run,
    and `seed` is a deterministic function of the search seed, the stage and the generation.
    `batch_size`, when set, asks for minibatch fitness: score every candidate of this call on the same
    `batch_size` examples, chosen by `minibatch(n_examples)` (common random numbers within a
    generation); None scores the whole split.
    """

    split: Split
    stage: str
    generation: int
    seed: int
    batch_size: int | None = attrs.field(
        default=None,
        validator=must(
            lambda v: v is None or (is_int(v) and v >= 1),
            "batch_size must be None (the whole split) or an integer >= 1, got {value!r}",
        ),
    )

    def minibatch(self, n_examples: int) -> NDArray[np.intp] | None:
        """Sorted indices of the examples to score out of `n_examples`, or None for all of them."""
        if self.batch_size is None or self.batch_size >= n_examples:
            return None
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(n_examples, size=self.batch_size, replace=False))


class Objective(Protocol):
    """An async callable scoring candidates: one raw loss per candidate, in order (lower is better).

    It may return NaN or inf for a candidate it could not score; the search ranks such candidates worst
    and counts them. Raising `BudgetExceeded` makes the search stop cleanly with the best so far; any
    other exception propagates (the last checkpoint lets the run resume).

    Money before queries: an objective that spends may also define `async check_affordable(candidates,
    context)`, raising `BudgetExceeded` (saying how much is needed) when one generation of `candidates`
    in `context` cannot be paid for; the search calls it before each stage's first generation, so a
    budget too small for one generation fails before any request.
    """

    async def __call__(
        self, candidates: Sequence[Candidate], context: EvaluationContext, /
    ) -> Sequence[float]:
        """Score `candidates` on `context.split`."""
        ...
