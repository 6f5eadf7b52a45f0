"""CMA-ES with an ask/tell interface, in numpy only.

The algorithm is the one of Hansen's tutorial ("The CMA Evolution Strategy: A Tutorial", 2016, arXiv
1604.00772) with the learning rates pycma uses today: weighted recombination with active (negative)
weights, cumulative step-size adaptation (CSA), rank-one and rank-mu covariance updates. Two variants
share one class: the full covariance matrix, and the diagonal one of sep-CMA-ES (Ros & Hansen 2008)
for large N, where a full matrix cannot be learned within a few hundred evaluations anyway.

Speed: the eigendecomposition is lazy, done every 1 / (10 N (c1 + cmu)) generations as the tutorial
suggests; and the covariance update itself is deferred too. Between two decompositions nothing reads C,
so the rank-one and rank-mu terms are queued as weighted vectors and applied in one matrix product right
before the next decomposition, or sooner once N of them are queued (holding more would cost more than
applying them). The result equals the per-generation update up to float rounding, and a
generation costs O(lambda N^2) for sampling only.

Box bounds use a boundary transform, not repair. The search distribution lives unbounded in "genotype"
space; every sample is mapped into the box by pycma's periodic linear-quadratic transform (the identity in
the interior, quadratic near a bound, mirrored beyond it). CMA then optimises f(T(x)) on R^N, so its
invariances and step-size control hold unchanged: no sample is thrown away (as resampling would) and no
probability mass piles up on a bound (as clipping would). That matters here because the paper's protocol
starts alpha exactly on its upper bound 1.0.
"""

from __future__ import annotations

import base64
import enum
import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
from numpy.typing import ArrayLike

from .._types import FloatArray
from .._validators import number
from ..errors import ConfigError, UsageError

__all__ = ["CMA", "BoxTransform", "StopCriteria", "StopReason", "default_popsize"]


_STATE_FORMAT = "evomerge-sdk/cma"
_STATE_VERSION = 1


class StopReason(str, enum.Enum):
    """Why an optimiser or a search stopped.

    CMA emits the first six; the two-stage search adds EARLY_STOPPING, BUDGET_EXCEEDED and
    COORDINATION_LOST; baselines that score a fixed list of candidates report COMPLETED, and random
    search MAX_EVALUATIONS.
    """

    MAX_EVALUATIONS = "max_evaluations"
    TARGET = "target"
    TOLFUN = "tolfun"
    TOLX = "tolx"
    STAGNATION = "stagnation"
    CONDITION = "condition"
    EARLY_STOPPING = "early_stopping"
    BUDGET_EXCEEDED = "budget_exceeded"
    COORDINATION_LOST = "coordination_lost"
    COMPLETED = "completed"


_NON_NEGATIVE = number(strict=False)


@attrs.frozen
class StopCriteria:
    """When CMA reports that it should stop (the tutorial's criteria; 0 disables a tolerance).

    `max_evaluations` never lets a generation overshoot: CMA stops when the next full generation would
    exceed it. `target` stops once the best value is <= target.
    """

    max_evaluations: int | None = attrs.field(
        default=None, validator=number(integer=True, strict=False, allow_none=True)
    )
    target: float | None = None
    tolfun: float = attrs.field(default=1e-11, validator=_NON_NEGATIVE)
    tolx: float = attrs.field(default=1e-11, validator=_NON_NEGATIVE)
    stagnation: bool = True
    max_condition: float = attrs.field(default=1e14, validator=_NON_NEGATIVE)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StopCriteria:
        """The inverse of `to_dict`."""
        return cls(**data)


def default_popsize(n: int) -> int:
    """The standard population size 4 + floor(3 ln N)."""
    return 4 + int(3 * math.log(n))


def _as_bound(value: ArrayLike | None, n: int, name: str, default: float) -> FloatArray:
    if value is None:
        return np.full(n, default)
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ConfigError(f"{name} bound must be a scalar or have {n} entries, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ConfigError(f"{name} bound contains NaN")
    return arr


class BoxTransform:
    """pycma's periodic linear-quadratic map from R^N onto the box [lower, upper].

    Identity on [lower + al, upper - au] with margins al = min((upper - lower) / 2, 0.05 max(|lower|, 1))
    (au likewise), quadratic in the margins, mirrored beyond them and periodic. An infinite side has no
    margin and no periodicity.
    """

    def __init__(self, lower: ArrayLike | None, upper: ArrayLike | None, n: int) -> None:
        lb = _as_bound(lower, n, "lower", -np.inf)
        ub = _as_bound(upper, n, "upper", np.inf)
        bad = np.flatnonzero(~(lb < ub))
        if bad.size:
            i = int(bad[0])
            raise ConfigError(
                f"lower bound must be < upper bound, got lower={lb[i]} >= upper={ub[i]} at index {i}"
            )
        self.lower = lb
        self.upper = ub
        self._fl = np.isfinite(lb)
        self._fu = np.isfinite(ub)
        self._both = self._fl & self._fu
        # Finite stand-ins keep infinite sides out of the arithmetic; masks decide what applies.
        self._lb = np.where(self._fl, lb, 0.0)
        self._ub = np.where(self._fu, ub, 0.0)
        half = np.where(self._both, (self._ub - self._lb) / 2, np.inf)
        self._al = np.where(self._fl, np.minimum(half, 0.05 * np.maximum(np.abs(self._lb), 1.0)), 1.0)
        self._au = np.where(self._fu, np.minimum(half, 0.05 * np.maximum(np.abs(self._ub), 1.0)), 1.0)
        span = np.where(self._both, self._ub - self._lb, 0.0)
        self._period = 2 * (span + self._al + self._au)
        self._start = self._lb - 2 * self._al - span / 2
        self._stop = self._ub + 2 * self._au + span / 2
        self.bounded = bool(self._fl.any() or self._fu.any())

    def __call__(self, x: FloatArray) -> FloatArray:
        """Map genotypes (..., N) into the box."""
        lb, ub, al, au = self._lb, self._ub, self._al, self._au
        y = np.where(
            self._both & ((x < self._start) | (x > self._stop)),
            x - self._period * np.floor((x - self._start) / self._period),
            x,
        )
        y = np.where(self._fu & (y > ub + au), 2 * (ub + au) - y, y)
        y = np.where(self._fl & (y < lb - al), 2 * (lb - al) - y, y)
        y = np.where(self._fl & (y < lb + al), lb + (y - (lb - al)) ** 2 / (4 * al), y)
        out: FloatArray = np.where(self._fu & (y > ub - au), ub - (y - (ub + au)) ** 2 / (4 * au), y)
        return out

    def inverse(self, y: FloatArray) -> FloatArray:
        """A genotype that maps to the feasible point `y` (the one inside [lower - al, upper + au])."""
        if np.any(y < self.lower) or np.any(y > self.upper):
            raise ConfigError("the initial mean must lie within the bounds")
        lb, ub, al, au = self._lb, self._ub, self._al, self._au
        x = np.where(self._fl & (y < lb + al), lb - al + 2 * np.sqrt(np.maximum(al * (y - lb), 0.0)), y)
        out: FloatArray = np.where(
            self._fu & (y > ub - au), ub + au - 2 * np.sqrt(np.maximum(au * (ub - y), 0.0)), x
        )
        return out


def _encode(arr: FloatArray) -> dict[str, Any]:
    # Raw little-endian float64 round-trips exactly and keeps N x N matrices compact.
    data = np.ascontiguousarray(arr, dtype="<f8")
    return {"shape": list(data.shape), "f8": base64.b64encode(data.tobytes()).decode("ascii")}


def _decode(obj: dict[str, Any]) -> FloatArray:
    raw = base64.b64decode(obj["f8"].encode("ascii"), validate=True)
    out: FloatArray = np.frombuffer(raw, dtype="<f8").astype(np.float64).reshape(obj["shape"])
    return out


@attrs.frozen
class _Parameters:
    """Strategy parameters; pure functions of (N, lambda, diagonal), so a restored state recomputes them."""

    weights: FloatArray
    mu: int
    mueff: float
    cc: float
    cs: float
    c1: float
    cmu: float
    damps: float
    chi_n: float
    eigen_gap: float

    @classmethod
    def compute(cls, n: int, lam: int, diagonal: bool) -> _Parameters:
        raw = math.log((lam + 1) / 2) - np.log(np.arange(1, lam + 1))
        mu = lam // 2
        pos, neg = raw[:mu], raw[mu:]
        mueff = float(pos.sum() ** 2 / (pos**2).sum())
        mueff_neg = float(neg.sum() ** 2 / (neg**2).sum()) if np.any(neg != 0) else 0.0
        if diagonal:
            c1 = 1 / (n + 2 * math.sqrt(n) + mueff / n)
            cmu = min(1 - c1, (0.25 + mueff + 1 / mueff - 2) / (n + 4 * math.sqrt(n) + mueff / 2))
            cc = (1 + 1 / n + mueff / n) / (math.sqrt(n) + 1 / n + 2 * mueff / n)
        else:
            c1 = min(1.0, lam / 6) * 2 / ((n + 1.3) ** 2 + mueff)
            cmu = min(1 - c1, 2 * (0.25 + mueff + 1 / mueff - 2) / ((n + 2) ** 2 + mueff))
            cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
        cs = min(0.5, (mueff + 2) / (n + mueff + 3))
        damps = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
        weights = np.zeros(lam)
        weights[:mu] = pos / pos.sum()
        neg_sum = float(-neg.sum())
        if neg_sum > 0 and cmu > 0:
            # Tutorial (53): zero decay, then positive definiteness, then a mueff-based cap.
            total = min(1 + c1 / cmu, (1 - c1 - cmu) / (n * cmu), 1 + 2 * mueff_neg / (mueff + 2))
            weights[mu:] = neg / neg_sum * total
        chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        eigen_gap = 1 / ((c1 + cmu) * n * 10)
        return cls(weights, mu, mueff, cc, cs, c1, cmu, damps, chi_n, eigen_gap)


class CMA:
    """CMA-ES, ask/tell: `ask()` a population, evaluate it, `tell(values)` in the same order.

    `diagonal=True` gives sep-CMA-ES (O(N) per sample instead of O(N^2)). Every random draw comes from a
    PCG64 generator seeded with `seed`, and `state_dict()` / `CMA.from_state()` round-trip exactly, so a
    restored optimiser asks the identical next population.

    Fitness policy: NaN and +inf are ranked behind every finite value (ties in ask order) and never
    become the best; -inf raises ConfigError, since no real loss is infinitely good.
    """

    def __init__(
        self,
        mean: ArrayLike,
        sigma: float,
        *,
        lower: ArrayLike | None = None,
        upper: ArrayLike | None = None,
        popsize: int | None = None,
        seed: int = 0,
        diagonal: bool = False,
        stop: StopCriteria | None = None,
    ) -> None:
        x0 = np.array(mean, dtype=np.float64)
        if x0.ndim != 1 or x0.size == 0:
            raise ConfigError(f"mean must be a non-empty vector, got shape {x0.shape}")
        if not np.all(np.isfinite(x0)):
            raise ConfigError("mean must be finite")
        n = x0.size
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"sigma must be a finite number > 0, got {sigma!r}")
        if popsize is None:
            popsize = default_popsize(n)
        if isinstance(popsize, bool) or not isinstance(popsize, (int, np.integer)) or popsize < 2:
            raise ConfigError(f"popsize must be an integer >= 2, got {popsize!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self._n = n
        self._lam = int(popsize)
        self._diagonal = bool(diagonal)
        self._seed = int(seed)
        self._stop = stop if stop is not None else StopCriteria()
        self._box = BoxTransform(lower, upper, n)
        self._p = _Parameters.compute(n, self._lam, self._diagonal)
        self._rng = np.random.Generator(np.random.PCG64(self._seed))
        self._mean = self._box.inverse(x0) if self._box.bounded else x0
        self._sigma = float(sigma)
        self._pc = np.zeros(n)
        self._ps = np.zeros(n)
        # Full: C, eigenbasis B and sqrt-eigenvalues D. Diagonal: C and D are vectors, B is unused.
        self._c = np.ones(n) if self._diagonal else np.eye(n)
        self._b = np.eye(0) if self._diagonal else np.eye(n)
        self._d = np.ones(n)
        self._diag_c = np.ones(n)
        self._pending_vectors: list[FloatArray] = []
        self._pending_weights = np.zeros(0)
        self._pending_scale = 1.0
        self._last_eigen = 0
        self._generation = 0
        self._evaluations = 0
        self._best_x: FloatArray | None = None
        self._best_f = math.inf
        self._best_history: list[float] = []
        self._median_history: list[float] = []
        self._last_values: FloatArray = np.zeros(0)
        self._asked_z: FloatArray | None = None
        self._asked_y: FloatArray | None = None

    # -- read-only views -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of variables N."""
        return self._n

    @property
    def popsize(self) -> int:
        """Population size lambda."""
        return self._lam

    @property
    def diagonal(self) -> bool:
        """True for sep-CMA-ES."""
        return self._diagonal

    @property
    def generation(self) -> int:
        """Generations told so far."""
        return self._generation

    @property
    def evaluations(self) -> int:
        """Function values told so far."""
        return self._evaluations

    @property
    def sigma(self) -> float:
        """Current step size."""
        return self._sigma

    @property
    def mean(self) -> FloatArray:
        """The distribution mean mapped into the box (the point CMA currently believes best)."""
        return self._phenotype(self._mean)

    @property
    def best_x(self) -> FloatArray | None:
        """The best solution told so far (None until a finite value arrives)."""
        return None if self._best_x is None else self._best_x.copy()

    @property
    def best_f(self) -> float:
        """The best finite value told so far (inf until one arrives)."""
        return self._best_f

    @property
    def condition_number(self) -> float:
        """Condition number of C as of the last decomposition."""
        return float((self._d.max() / self._d.min()) ** 2)

    @property
    def stds(self) -> FloatArray:
        """Per-coordinate standard deviations sigma * sqrt(diag C), in genotype space."""
        out: FloatArray = self._sigma * np.sqrt(self._diag_c)
        return out

    @property
    def stop_criteria(self) -> StopCriteria:
        """The stop criteria in force."""
        return self._stop

    def covariance(self) -> FloatArray:
        """The current covariance matrix C (a diagonal matrix for sep-CMA), pending updates applied."""
        if self._diagonal:
            out: FloatArray = np.diag(self._c)
            return out
        return self._applied_c()

    # -- ask / tell --------------------------------------------------------------------------------
    def ask(self) -> FloatArray:
        """The next population, shape (popsize, N), inside the bounds; asking again before tell repeats it."""
        if self._asked_z is None:
            if not self._diagonal and self._generation >= self._last_eigen + self._p.eigen_gap:
                self._decompose()
            z = self._rng.standard_normal((self._lam, self._n))
            y = z * self._d if self._diagonal else (z * self._d) @ self._b.T
            self._asked_z, self._asked_y = z, y
        assert self._asked_y is not None
        return self._phenotype(self._mean + self._sigma * self._asked_y)

    def tell(self, values: ArrayLike) -> None:
        """Update the distribution from the values of the last asked population, in ask order."""
        if self._asked_z is None or self._asked_y is None:
            raise UsageError("tell() needs a population from ask() first")
        try:
            f = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"tell() expects real numbers, got {values!r:.200}") from exc
        if f.shape != (self._lam,):
            raise ConfigError(
                f"tell() expects {self._lam} values (one per asked solution), got shape {f.shape}"
            )
        if np.any(f == -np.inf):
            raise ConfigError("fitness -inf is not allowed (a loss cannot be infinitely good)")
        finite = np.isfinite(f)
        ranked = np.where(finite, f, np.inf)
        order = np.argsort(ranked, kind="stable")
        p, n = self._p, self._n
        z = self._asked_z[order]
        y = self._asked_y[order]
        w_pos = p.weights[: p.mu]
        zw = w_pos @ z[: p.mu]
        yw = w_pos @ y[: p.mu]
        if finite[order[0]] and ranked[order[0]] < self._best_f:
            self._best_f = float(ranked[order[0]])
            self._best_x = self._phenotype(self._mean + self._sigma * self._asked_y[order[0]])
        self._mean = self._mean + self._sigma * yw
        self._generation += 1
        self._evaluations += self._lam
        cs, cc = p.cs, p.cc
        self._ps = (1 - cs) * self._ps + math.sqrt(cs * (2 - cs) * p.mueff) * (
            zw if self._diagonal else self._b @ zw
        )
        ps2 = float(self._ps @ self._ps)
        hsig = ps2 / (1 - (1 - cs) ** (2 * self._generation)) / n < 2 + 4 / (n + 1)
        self._pc = (1 - cc) * self._pc + (math.sqrt(cc * (2 - cc) * p.mueff) if hsig else 0.0) * yw
        # Active CMA: negative weights are rescaled by N / ||C^{-1/2} y||^2 = N / ||z||^2.
        w = p.weights.copy()
        neg = w < 0
        w[neg] *= n / np.maximum(np.einsum("ij,ij->i", z[neg], z[neg]), 1e-300)
        decay = 1 + p.c1 * (0.0 if hsig else cc * (2 - cc)) - p.c1 - p.cmu * float(p.weights.sum())
        cw = p.cmu * w
        diag_update = p.c1 * self._pc**2 + cw @ (y * y)
        self._diag_c = decay * self._diag_c + diag_update
        if self._diagonal:
            self._c = self._diag_c.copy()
            if np.any(self._c <= 0):
                raise FloatingPointError("covariance lost positive definiteness")
            self._d = np.sqrt(self._c)
        else:
            self._queue(decay, np.vstack([self._pc[None, :], y]), np.concatenate([[p.c1], cw]))
        self._sigma *= math.exp(min(1.0, (cs / p.damps) * (math.sqrt(ps2) / p.chi_n - 1)))
        self._record(ranked[order])
        self._last_values = f.copy()
        self._asked_z = self._asked_y = None

    # -- stop conditions ---------------------------------------------------------------------------
    def stop(self) -> StopReason | None:
        """The first stop criterion that holds, or None to go on."""
        s = self._stop
        if s.max_evaluations is not None and self._evaluations + self._lam > s.max_evaluations:
            return StopReason.MAX_EVALUATIONS
        if self._generation == 0:
            return None
        if s.target is not None and self._best_f <= s.target:
            return StopReason.TARGET
        hist = 10 + math.ceil(30 * self._n / self._lam)
        if s.tolfun > 0 and self._generation >= hist and np.all(np.isfinite(self._last_values)):
            recent = np.concatenate([self._best_history[-hist:], self._last_values])
            if float(np.ptp(recent)) < s.tolfun:
                return StopReason.TOLFUN
        if (
            s.tolx > 0
            and self._sigma * max(float(np.abs(self._pc).max()), float(np.sqrt(self._diag_c.max()))) < s.tolx
        ):
            return StopReason.TOLX
        if s.stagnation and self._stagnating():
            return StopReason.STAGNATION
        if s.max_condition > 0 and self.condition_number > s.max_condition:
            return StopReason.CONDITION
        return None

    def _stagnating(self) -> bool:
        # Tutorial: over the last 20% of generations (at least 120 + 30 N / lambda, at most 20000), the
        # median of the newest 30% of best and median values is no better than that of the oldest 30%.
        window = max(120 + math.ceil(30 * self._n / self._lam), int(0.2 * self._generation))
        window = min(window, 20000)
        if self._generation < window:
            return False
        k = max(1, int(0.3 * window))
        for hist in (self._best_history, self._median_history):
            h = hist[-window:]
            if np.median(h[-k:]) < np.median(h[:k]):
                return False
        return True

    def _record(self, ranked: FloatArray) -> None:
        # `ranked` is sorted, with NaN mapped to inf.
        lam = ranked.size
        self._best_history.append(float(ranked[0]))
        self._median_history.append(float((ranked[(lam - 1) // 2] + ranked[lam // 2]) / 2))
        if len(self._best_history) > 20000:
            del self._best_history[0], self._median_history[0]

    # -- covariance internals ----------------------------------------------------------------------
    def _queue(self, decay: float, vectors: FloatArray, weights: FloatArray) -> None:
        self._pending_weights = np.concatenate([self._pending_weights * decay, weights])
        self._pending_scale *= decay
        self._pending_vectors.append(vectors)
        if self._pending_weights.size >= self._n:
            # Holding more than N vectors costs more than applying them.
            self._c = self._applied_c()
            self._clear_pending()

    def _applied_c(self) -> FloatArray:
        if not self._pending_vectors:
            same: FloatArray = self._c.copy()
            return same
        v = np.vstack(self._pending_vectors)
        out: FloatArray = self._pending_scale * self._c + (v.T * self._pending_weights) @ v
        return out

    def _clear_pending(self) -> None:
        self._pending_vectors = []
        self._pending_weights = np.zeros(0)
        self._pending_scale = 1.0

    def _decompose(self) -> None:
        c = self._applied_c()
        c = (c + c.T) / 2
        self._clear_pending()
        eigenvalues, b = np.linalg.eigh(c)
        floor = 1e-14 * float(eigenvalues.max())
        if eigenvalues.min() < floor:
            # Rounding broke definiteness (condition ~1e14 and beyond): lift the spectrum, keep the axes.
            shift = floor - float(eigenvalues.min())
            c[np.diag_indices(self._n)] += shift
            eigenvalues = eigenvalues + shift
        self._c, self._b, self._d = c, b, np.sqrt(eigenvalues)
        self._diag_c = np.diag(c).copy()
        self._last_eigen = self._generation

    def _phenotype(self, x: FloatArray) -> FloatArray:
        return self._box(x) if self._box.bounded else x.copy()

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot from which `from_state` rebuilds this optimiser exactly."""

        def bound(a: FloatArray) -> list[float | None]:
            return [float(v) if math.isfinite(v) else None for v in a]

        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "n": self._n,
            "popsize": self._lam,
            "diagonal": self._diagonal,
            "seed": self._seed,
            "lower": bound(self._box.lower),
            "upper": bound(self._box.upper),
            "stop": self._stop.to_dict(),
            "rng": self._rng.bit_generator.state,
            "mean": _encode(self._mean),
            "sigma": self._sigma,
            "pc": _encode(self._pc),
            "ps": _encode(self._ps),
            "c": _encode(self._c),
            "b": _encode(self._b),
            "d": _encode(self._d),
            "diag_c": _encode(self._diag_c),
            "pending_vectors": [_encode(v) for v in self._pending_vectors],
            "pending_weights": _encode(self._pending_weights),
            "pending_scale": self._pending_scale,
            "last_eigen": self._last_eigen,
            "generation": self._generation,
            "evaluations": self._evaluations,
            "best_x": None if self._best_x is None else _encode(self._best_x),
            "best_f": None if self._best_x is None else self._best_f,
            "best_history": _encode(np.asarray(self._best_history, dtype=np.float64)),
            "median_history": _encode(np.asarray(self._median_history, dtype=np.float64)),
            "last_values": _encode(self._last_values),
            "asked_z": None if self._asked_z is None else _encode(self._asked_z),
            "asked_y": None if self._asked_y is None else _encode(self._asked_y),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CMA:
        """Rebuild an optimiser from `state_dict()`; a foreign or damaged state raises ConfigError."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ConfigError("not a CMA state (missing or wrong 'format')")
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"unsupported CMA state version {state.get('version')!r}")
        try:
            n = int(state["n"])

            def bound(values: Sequence[float | None], default: float) -> FloatArray:
                return np.array([default if v is None else v for v in values], dtype=np.float64)

            lower = bound(state["lower"], -np.inf)
            upper = bound(state["upper"], np.inf)
            mean = _decode(state["mean"])
            # Build with a feasible stand-in mean, then overwrite every state variable.
            centre = np.clip(np.zeros(n), lower, upper)
            es = cls(
                centre,
                float(state["sigma"]),
                lower=lower,
                upper=upper,
                popsize=int(state["popsize"]),
                seed=int(state["seed"]),
                diagonal=bool(state["diagonal"]),
                stop=StopCriteria.from_dict(state["stop"]),
            )
            es._rng.bit_generator.state = state["rng"]
            es._mean = mean
            es._pc = _decode(state["pc"])
            es._ps = _decode(state["ps"])
            es._c = _decode(state["c"])
            es._b = _decode(state["b"])
            es._d = _decode(state["d"])
            es._diag_c = _decode(state["diag_c"])
            es._pending_vectors = [_decode(v) for v in state["pending_vectors"]]
            es._pending_weights = _decode(state["pending_weights"])
            es._pending_scale = float(state["pending_scale"])
            es._last_eigen = int(state["last_eigen"])
            es._generation = int(state["generation"])
            es._evaluations = int(state["evaluations"])
            es._best_x = None if state["best_x"] is None else _decode(state["best_x"])
            es._best_f = math.inf if state["best_f"] is None else float(state["best_f"])
            es._best_history = [float(v) for v in _decode(state["best_history"])]
            es._median_history = [float(v) for v in _decode(state["median_history"])]
            es._last_values = _decode(state["last_values"])
            es._asked_z = None if state["asked_z"] is None else _decode(state["asked_z"])
            es._asked_y = None if state["asked_y"] is None else _decode(state["asked_y"])
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"damaged CMA state: {exc}") from exc
        shapes_ok = (
            mean.shape == (n,)
            and es._pc.shape == (n,)
            and es._ps.shape == (n,)
            and es._d.shape == (n,)
            and es._c.shape == ((n,) if es._diagonal else (n, n))
        )
        if not shapes_ok:
            raise ConfigError("damaged CMA state: array shapes do not match n")
        return es
