"""The two-stage Evo-Merging search of DESIGN 1.1 over any objective, with checkpoints (settings: `config`).

Stage 1 (denoise) searches alpha with beta fixed at 1/N; stage 2 (scale) searches beta with alpha fixed
at the best of stage 1. Each stage runs CMA-ES on fitness = loss + penalty * mean(|searched vector|),
hands each generation to the objective in one call, keeps the best candidate, optionally stops early
when the incumbent's loss on a held-out split stops improving, reports progress and writes a checkpoint
after every generation. A run resumed from its checkpoint asks exactly the candidates, and returns
exactly the result, of an uninterrupted run.

Failure policy: a NaN or infinite loss from the objective ranks its candidate worst (it never becomes the
best) and is counted in `nonfinite_evaluations`; `BudgetExceeded` from the objective ends the search
cleanly with the best so far (`stop_reason == BUDGET_EXCEEDED`, checkpoint left resumable), and so does
`CoordinationLost` (`COORDINATION_LOST`: the shared budget's Redis went away); any other exception
propagates, and the checkpoint of the last complete generation lets the run resume.

Stage 2 starts from stage 1's best: that candidate (beta = 1/N) is already a stage-2 point, so it stays
the incumbent, re-scored with the stage-2 penalty, until stage 2 finds better. The result is the best
candidate under the last stage's fitness.

A stage with `batch_size` scores each generation on a minibatch of the validation split, the same one for
the whole generation (`EvaluationContext.minibatch`), a fresh one per generation. Its incumbent only ever
comes from scoring the CMA mean on the whole split (every `rescore_every` generations and when the stage
ends), so the loss a search reports is always a whole-split loss of the merge it returns.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
import numpy as np

from .._checks import is_int
from .._io import write_json_atomic
from .._types import FloatArray
from ..errors import BudgetExceeded, ConfigError, CoordinationLost, EvomergeError
from ._cmaes import CMA, StopCriteria, StopReason
from ._config import DEFAULT, EarlyStopping, SearchConfig, Stage, budget_too_small
from ._objective import Candidate, EvaluationContext, Objective, Split

__all__ = [
    "EvoMerge",
    "HistoryPoint",
    "Progress",
    "ProgressCallback",
    "SearchResult",
    "StageResult",
]


_CHECKPOINT_FORMAT = "evomerge-sdk/search-checkpoint"
_CHECKPOINT_VERSION = 2


# -- JSON helpers ------------------------------------------------------------------------------------
def _num(x: float) -> float | str:
    # Strict JSON has no NaN/inf; spell them as strings that float() reads back.
    return x if math.isfinite(x) else str(x)


def _unnum(x: float | str | None) -> float:
    return float(x) if x is not None else math.nan


def _opt_num(x: float | None) -> float | str | None:
    return None if x is None else _num(x)


def _opt_unnum(x: float | str | None) -> float | None:
    return None if x is None else float(x)


# -- records -----------------------------------------------------------------------------------------
@attrs.frozen
class Progress:
    """What the progress callback receives after every generation.

    `candidate` is the incumbent (the best merge scored on the whole validation split so far), and
    `mean_candidate` the merge at the CMA mean, the stage's current best guess.
    """

    stage: str
    generation: int
    stage_generation: int
    evaluations: int
    stage_evaluations: int
    best_loss: float
    best_fitness: float
    generation_loss: float
    held_out_loss: float | None
    mean: FloatArray = attrs.field(eq=False)
    sigma: float
    candidate: Candidate | None = None
    mean_candidate: Candidate | None = None


ProgressCallback = Callable[[Progress], Awaitable[None] | None]


@attrs.frozen
class HistoryPoint:
    """The incumbent after one generation: evaluations vs best loss, for convergence plots."""

    stage: str
    generation: int
    evaluations: int
    best_loss: float
    best_fitness: float
    generation_loss: float
    held_out_loss: float | None

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON dict."""
        return {
            "stage": self.stage,
            "generation": self.generation,
            "evaluations": self.evaluations,
            "best_loss": _num(self.best_loss),
            "best_fitness": _num(self.best_fitness),
            "generation_loss": _num(self.generation_loss),
            "held_out_loss": _opt_num(self.held_out_loss),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HistoryPoint:
        """The inverse of `to_dict`."""
        return cls(
            stage=d["stage"],
            generation=int(d["generation"]),
            evaluations=int(d["evaluations"]),
            best_loss=_unnum(d["best_loss"]),
            best_fitness=_unnum(d["best_fitness"]),
            generation_loss=_unnum(d["generation_loss"]),
            held_out_loss=_opt_unnum(d["held_out_loss"]),
        )


@attrs.frozen
class StageResult:
    """How one stage (or one baseline) ended: its best candidate, cost, final CMA mean and why it stopped."""

    name: str
    candidate: Candidate
    loss: float
    fitness: float
    evaluations: int
    generations: int
    stop_reason: StopReason
    mean: FloatArray | None = attrs.field(default=None, eq=False)
    sigma: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON dict."""
        return {
            "name": self.name,
            "candidate": self.candidate.to_dict(),
            "loss": _num(self.loss),
            "fitness": _num(self.fitness),
            "evaluations": self.evaluations,
            "generations": self.generations,
            "stop_reason": self.stop_reason.value,
            "mean": None if self.mean is None else self.mean.tolist(),
            "sigma": self.sigma,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageResult:
        """The inverse of `to_dict`."""
        return cls(
            name=d["name"],
            candidate=Candidate.from_dict(d["candidate"]),
            loss=_unnum(d["loss"]),
            fitness=_unnum(d["fitness"]),
            evaluations=int(d["evaluations"]),
            generations=int(d["generations"]),
            stop_reason=StopReason(d["stop_reason"]),
            mean=None if d["mean"] is None else np.asarray(d["mean"], dtype=np.float64),
            sigma=d["sigma"],
        )


@attrs.frozen
class SearchResult:
    """The outcome of a search or baseline: the best merge, what it cost and how it got there.

    `evaluations` counts validation-split evaluations, `held_out_evaluations` the early-stopping ones,
    `nonfinite_evaluations` the candidates the objective scored NaN or inf.
    """

    method: str
    candidate: Candidate
    loss: float
    fitness: float
    stop_reason: StopReason
    evaluations: int
    held_out_evaluations: int = 0
    nonfinite_evaluations: int = 0
    held_out_loss: float | None = None
    stages: tuple[StageResult, ...] = ()
    history: tuple[HistoryPoint, ...] = ()

    @property
    def alpha(self) -> FloatArray:
        """The best alpha."""
        return self.candidate.alpha

    @property
    def beta(self) -> FloatArray:
        """The best beta."""
        return self.candidate.beta

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON dict (floats round-trip exactly)."""
        return {
            "method": self.method,
            "candidate": self.candidate.to_dict(),
            "loss": _num(self.loss),
            "fitness": _num(self.fitness),
            "stop_reason": self.stop_reason.value,
            "evaluations": self.evaluations,
            "held_out_evaluations": self.held_out_evaluations,
            "nonfinite_evaluations": self.nonfinite_evaluations,
            "held_out_loss": _opt_num(self.held_out_loss),
            "stages": [s.to_dict() for s in self.stages],
            "history": [h.to_dict() for h in self.history],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchResult:
        """The inverse of `to_dict`."""
        return cls(
            method=d["method"],
            candidate=Candidate.from_dict(d["candidate"]),
            loss=_unnum(d["loss"]),
            fitness=_unnum(d["fitness"]),
            stop_reason=StopReason(d["stop_reason"]),
            evaluations=int(d["evaluations"]),
            held_out_evaluations=int(d["held_out_evaluations"]),
            nonfinite_evaluations=int(d["nonfinite_evaluations"]),
            held_out_loss=_opt_unnum(d["held_out_loss"]),
            stages=tuple(StageResult.from_dict(s) for s in d["stages"]),
            history=tuple(HistoryPoint.from_dict(h) for h in d["history"]),
        )

    def to_json(self) -> str:
        """Strict JSON text."""
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> SearchResult:
        """The inverse of `to_json`."""
        return cls.from_dict(json.loads(text))


# -- shared evaluation plumbing (also used by the baselines) -----------------------------------------
def derive_seed(seed: int, stage_index: int, generation: int) -> int:
    """A 63-bit seed that depends only on (search seed, stage, generation)."""
    state = np.random.SeedSequence([seed, stage_index, generation]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


async def evaluate_losses(
    objective: Objective, candidates: Sequence[Candidate], context: EvaluationContext
) -> FloatArray:
    """Call the objective and check its answer: one real number per candidate (NaN/inf allowed)."""
    pending = objective(candidates, context)
    if not inspect.isawaitable(pending):
        raise ConfigError("the objective must be async: `async def objective(candidates, context)`")
    raw = await pending
    try:
        losses = np.array([float(v) for v in raw], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the objective must return numbers, got {raw!r:.200}") from exc
    if losses.shape != (len(candidates),):
        raise ConfigError(f"the objective returned {losses.size} losses for {len(candidates)} candidates")
    return losses


@attrs.define
class _Incumbent:
    candidate: Candidate
    loss: float
    fitness: float
    held_out: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.to_dict(),
            "loss": _num(self.loss),
            "fitness": _num(self.fitness),
            "held_out": _opt_num(self.held_out),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Incumbent:
        return cls(
            Candidate.from_dict(d["candidate"]),
            _unnum(d["loss"]),
            _unnum(d["fitness"]),
            _opt_unnum(d["held_out"]),
        )


@attrs.define
class _RunState:
    """Everything a resumed run needs; written after every generation."""

    stage_index: int = 0
    es: CMA | None = None
    fixed: FloatArray | None = None
    incumbent: _Incumbent | None = None
    stage_generation: int = 0
    stage_evaluations: int = 0
    generation: int = 0
    evaluations: int = 0
    held_out_evaluations: int = 0
    nonfinite: int = 0
    best_held_out: float | None = None
    since_improvement: int = 0
    rescored_at: int = -1
    stages: list[StageResult] = attrs.Factory(list)
    history: list[HistoryPoint] = attrs.Factory(list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage_index": self.stage_index,
            "es": None if self.es is None else self.es.state_dict(),
            "fixed": None if self.fixed is None else self.fixed.tolist(),
            "incumbent": None if self.incumbent is None else self.incumbent.to_dict(),
            "stage_generation": self.stage_generation,
            "stage_evaluations": self.stage_evaluations,
            "generation": self.generation,
            "evaluations": self.evaluations,
            "held_out_evaluations": self.held_out_evaluations,
            "nonfinite": self.nonfinite,
            "best_held_out": _opt_num(self.best_held_out),
            "since_improvement": self.since_improvement,
            "rescored_at": self.rescored_at,
            "stages": [s.to_dict() for s in self.stages],
            "history": [h.to_dict() for h in self.history],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _RunState:
        return cls(
            stage_index=int(d["stage_index"]),
            es=None if d["es"] is None else CMA.from_state(d["es"]),
            fixed=None if d["fixed"] is None else np.asarray(d["fixed"], dtype=np.float64),
            incumbent=None if d["incumbent"] is None else _Incumbent.from_dict(d["incumbent"]),
            stage_generation=int(d["stage_generation"]),
            stage_evaluations=int(d["stage_evaluations"]),
            generation=int(d["generation"]),
            evaluations=int(d["evaluations"]),
            held_out_evaluations=int(d["held_out_evaluations"]),
            nonfinite=int(d["nonfinite"]),
            best_held_out=_opt_unnum(d["best_held_out"]),
            since_improvement=int(d["since_improvement"]),
            rescored_at=int(d["rescored_at"]),
            stages=[StageResult.from_dict(s) for s in d["stages"]],
            history=[HistoryPoint.from_dict(h) for h in d["history"]],
        )


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


# -- the search --------------------------------------------------------------------------------------
class EvoMerge:
    """The two-stage Evo-Merging search: `result = await EvoMerge(objective, n, PAPER).run()`.

    With `checkpoint`, the state is written there (atomically, as JSON) after every generation, and a
    run that finds a checkpoint of the same config and pool size resumes from it; a finished run's
    checkpoint returns its result at once. A checkpoint of another config or pool size, or a damaged
    one, raises ConfigError. `on_progress` may be a plain or an async function.
    """

    def __init__(
        self,
        objective: Objective,
        n_models: int,
        config: SearchConfig = DEFAULT,
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        if not is_int(n_models) or n_models < 1:
            raise ConfigError(f"n_models must be a positive integer, got {n_models!r}")
        if not isinstance(config, SearchConfig):
            raise ConfigError(f"config must be a SearchConfig, got {type(config).__name__}")
        if not callable(objective):
            raise ConfigError(
                f"objective must be callable (candidates, context) -> losses, got {objective!r:.80}"
            )
        if on_progress is not None and not callable(on_progress):
            raise ConfigError(f"on_progress must be a function or None, got {on_progress!r:.80}")
        for stage in config.stages():
            settings = stage.config
            settings.start_value(n_models)
            if settings.max_evaluations < settings.popsize_value(n_models):
                message = budget_too_small(settings.max_evaluations, settings.popsize_value(n_models))
                raise ConfigError(f"stage {stage.name!r}: {message}")
        self.objective = objective
        self.n = n_models
        self.config = config
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise ConfigError(f"checkpoint must be a file path or None, got {checkpoint!r:.60}")
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.on_progress = on_progress

    # -- checkpoint I/O --------------------------------------------------------------------------
    def _checkpoint_doc(self, state: _RunState, result: SearchResult | None) -> dict[str, Any]:
        return {
            "format": _CHECKPOINT_FORMAT,
            "version": _CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "n_models": self.n,
            "finished": result is not None,
            "result": None if result is None else result.to_dict(),
            "state": state.to_dict(),
        }

    async def _save(self, state: _RunState, result: SearchResult | None = None) -> None:
        if self.checkpoint is None:
            return
        doc = self._checkpoint_doc(state, result)
        path = self.checkpoint
        await anyio.to_thread.run_sync(write_json_atomic, path, doc)

    def _load(self) -> tuple[_RunState, SearchResult | None] | None:
        path = self.checkpoint
        if path is None:
            return None
        # A checkpoint that cannot be written is the caller's setting: say so before paying for a generation.
        if path.is_dir():
            raise ConfigError(f"checkpoint {path} is a directory; give a file name")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"checkpoint {path}: cannot create its folder: {exc.strerror or exc}") from None
        try:  # a real write: permission bits do not tell (root, read-only or virtual file systems)
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(
                f"checkpoint {path}: cannot write in its folder: {exc.strerror or exc}"
            ) from None
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"checkpoint {path} is not readable JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != _CHECKPOINT_FORMAT:
            raise ConfigError(f"{path} is not an evomerge-sdk search checkpoint")
        if doc.get("version") != _CHECKPOINT_VERSION:
            raise ConfigError(f"checkpoint {path} has unsupported version {doc.get('version')!r}")
        if doc.get("n_models") != self.n:
            raise ConfigError(
                f"checkpoint {path} is for {doc.get('n_models')} models, this search has {self.n}"
            )
        if doc.get("config") != _canonical(self.config.to_dict()):
            raise ConfigError(f"checkpoint {path} was written by a different search config")
        try:
            state = _RunState.from_dict(doc["state"])
            result = SearchResult.from_dict(doc["result"]) if doc.get("finished") else None
            if not 0 <= state.stage_index <= len(self.config.stages()):
                raise ValueError(f"stage {state.stage_index} of a {len(self.config.stages())}-stage search")
            if state.fixed is not None and state.fixed.shape != (self.n,):
                raise ValueError(f"its fixed vector has {state.fixed.size} entries for {self.n} models")
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"checkpoint {path} is damaged: {exc}") from exc
        return state, result

    # -- running ---------------------------------------------------------------------------------
    async def run(self) -> SearchResult:
        """Run (or resume) the search and return the best merge found."""
        loaded = await anyio.to_thread.run_sync(self._load)
        if loaded is not None and loaded[1] is not None:
            return loaded[1]
        state = loaded[0] if loaded is not None else _RunState()
        stages = self.config.stages()
        try:
            while state.stage_index < len(stages):
                stage = stages[state.stage_index]
                if state.es is None:
                    self._begin_stage(state, stage)
                reason = await self._run_stage(state, stage)
                if stage.config.batch_size is not None and state.stage_generation > 0:
                    await self._rescore_mean(state, stage)
                self._end_stage(state, stage.name, reason)
        except (BudgetExceeded, CoordinationLost) as stop:
            if state.incumbent is None:
                raise
            # Both stop the same resumable way: the checkpoint holds the last whole generation.
            why = (
                StopReason.BUDGET_EXCEEDED
                if isinstance(stop, BudgetExceeded)
                else StopReason.COORDINATION_LOST
            )
            partial = []
            if state.es is not None:
                name = stages[state.stage_index].name
                partial = [self._stage_result(state, name, why)]
            return self._result(state, why, partial)
        result = self._result(state, state.stages[-1].stop_reason)
        await self._save(state, result)
        return result

    def _begin_stage(self, state: _RunState, stage: Stage) -> None:
        settings = stage.config
        n = self.n
        start = np.full(n, settings.start_value(n))
        if stage.searches == "alpha":
            state.fixed = np.full(n, 1.0 / n)
        else:
            # Stage 1's best alpha, or the fixed alpha when there was no stage 1.
            inc = state.incumbent
            state.fixed = (
                inc.candidate.alpha.copy() if inc is not None else np.full(n, self.config.fixed_alpha)
            )
        state.es = CMA(
            start,
            settings.sigma_value(n),
            lower=settings.lower,
            upper=settings.upper,
            popsize=settings.popsize,
            seed=derive_seed(self.config.seed, state.stage_index, 0),
            diagonal=settings.use_diagonal(n),
            stop=StopCriteria(
                max_evaluations=settings.max_evaluations,
                tolfun=settings.tolfun,
                tolx=settings.tolx,
                # Stagnation compares generations' values; minibatch values differ by their draw, not
                # by progress, so on a minibatch stage it fires on noise.
                stagnation=settings.batch_size is None,
            ),
        )
        if state.incumbent is not None:
            # The previous stage's best is a point of this stage too: keep it, re-scored with this penalty.
            incumbent = state.incumbent.candidate
            vec = incumbent.alpha if stage.searches == "alpha" else incumbent.beta
            state.incumbent.fitness = state.incumbent.loss + settings.penalty * float(np.mean(np.abs(vec)))
        state.stage_generation = 0
        state.stage_evaluations = 0
        state.best_held_out = None
        state.since_improvement = 0

    def _candidate(self, stage: Stage, fixed: FloatArray, x: FloatArray) -> Candidate:
        return Candidate(alpha=x, beta=fixed) if stage.searches == "alpha" else Candidate(alpha=fixed, beta=x)

    async def _run_stage(self, state: _RunState, stage: Stage) -> StopReason:
        name, settings = stage.name, stage.config
        es, fixed = state.es, state.fixed
        assert es is not None and fixed is not None
        early = self.config.early_stopping
        planned = False
        while True:
            reason = es.stop()
            if reason is not None:
                return reason
            if early is not None and state.since_improvement >= early.patience:
                return StopReason.EARLY_STOPPING
            xs = es.ask()
            candidates = [self._candidate(stage, fixed, x) for x in xs]
            context = EvaluationContext(
                split=Split.VALIDATION,
                stage=name,
                generation=state.generation,
                seed=derive_seed(self.config.seed, state.stage_index, state.stage_generation + 1),
                batch_size=settings.batch_size,
            )
            if not planned:  # money before queries: this stage's first generation here must be payable
                planned = True
                check = getattr(self.objective, "check_affordable", None)
                if check is not None:
                    await check(len(candidates), context)
            losses = await evaluate_losses(self.objective, candidates, context)
            finite = np.isfinite(losses)
            fitness = np.where(finite, losses + settings.penalty * np.mean(np.abs(xs), axis=1), np.inf)
            es.tell(fitness)
            state.stage_generation += 1
            state.generation += 1
            state.stage_evaluations += len(candidates)
            state.evaluations += len(candidates)
            state.nonfinite += int((~finite).sum())
            if settings.batch_size is None:
                best = int(np.argmin(fitness))
                if finite[best] and (state.incumbent is None or fitness[best] < state.incumbent.fitness):
                    state.incumbent = _Incumbent(candidates[best], float(losses[best]), float(fitness[best]))
            elif settings.rescore_every and state.stage_generation % settings.rescore_every == 0:
                await self._rescore_mean(state, stage)
            if early is not None:
                await self._check_held_out(state, name, early)
            gen_loss = float(losses[finite].min()) if finite.any() else math.nan
            inc = state.incumbent
            state.history.append(
                HistoryPoint(
                    stage=name,
                    generation=state.generation,
                    evaluations=state.evaluations,
                    best_loss=inc.loss if inc else math.inf,
                    best_fitness=inc.fitness if inc else math.inf,
                    generation_loss=gen_loss,
                    held_out_loss=inc.held_out if inc else None,
                )
            )
            await self._save(state)
            if self.on_progress is not None:
                progress = Progress(
                    stage=name,
                    generation=state.generation,
                    stage_generation=state.stage_generation,
                    evaluations=state.evaluations,
                    stage_evaluations=state.stage_evaluations,
                    best_loss=inc.loss if inc else math.inf,
                    best_fitness=inc.fitness if inc else math.inf,
                    generation_loss=gen_loss,
                    held_out_loss=inc.held_out if inc else None,
                    mean=es.mean,
                    sigma=es.sigma,
                    candidate=inc.candidate if inc else None,
                    mean_candidate=self._candidate(stage, fixed, es.mean),
                )
                maybe = self.on_progress(progress)
                if inspect.isawaitable(maybe):
                    await maybe

    async def _rescore_mean(self, state: _RunState, stage: Stage) -> None:
        name, settings = stage.name, stage.config
        """Score the CMA mean on the whole validation split; it becomes the incumbent if its fitness wins."""
        es, fixed = state.es, state.fixed
        assert es is not None and fixed is not None
        if state.rescored_at == state.generation:
            return
        x = es.mean
        candidate = self._candidate(stage, fixed, x)
        context = EvaluationContext(
            split=Split.VALIDATION,
            stage=name,
            generation=state.generation - 1,
            seed=derive_seed(self.config.seed, state.stage_index, state.stage_generation),
        )
        (loss,) = await evaluate_losses(self.objective, [candidate], context)
        state.rescored_at = state.generation
        state.stage_evaluations += 1
        state.evaluations += 1
        if not math.isfinite(loss):
            state.nonfinite += 1
            return
        fitness = float(loss) + settings.penalty * float(np.mean(np.abs(x)))
        if state.incumbent is None or fitness < state.incumbent.fitness:
            state.incumbent = _Incumbent(candidate, float(loss), fitness)

    async def _check_held_out(self, state: _RunState, name: str, early: EarlyStopping) -> None:
        inc = state.incumbent
        if inc is None:
            state.since_improvement += 1
            return
        if inc.held_out is None:
            context = EvaluationContext(
                split=Split.HELD_OUT,
                stage=name,
                # The generation (and seed) of the validation call this incumbent came out of.
                generation=state.generation - 1,
                seed=derive_seed(self.config.seed, state.stage_index, state.stage_generation),
            )
            (value,) = await evaluate_losses(self.objective, [inc.candidate], context)
            state.held_out_evaluations += 1
            inc.held_out = float(value) if math.isfinite(value) else math.inf
        if state.best_held_out is None or inc.held_out < state.best_held_out - early.min_delta:
            state.best_held_out = inc.held_out
            state.since_improvement = 0
        else:
            state.since_improvement += 1

    def _stage_result(self, state: _RunState, name: str, reason: StopReason) -> StageResult:
        es, inc = state.es, state.incumbent
        assert es is not None and inc is not None
        return StageResult(
            name=name,
            candidate=inc.candidate,
            loss=inc.loss,
            fitness=inc.fitness,
            evaluations=state.stage_evaluations,
            generations=state.stage_generation,
            stop_reason=reason,
            mean=es.mean,
            sigma=es.sigma,
        )

    def _end_stage(self, state: _RunState, name: str, reason: StopReason) -> None:
        if state.incumbent is None:
            raise EvomergeError(f"stage {name!r}: the objective returned no finite loss for any candidate")
        state.stages.append(self._stage_result(state, name, reason))
        state.stage_index += 1
        state.es = None
        state.fixed = None

    def _result(
        self, state: _RunState, reason: StopReason, partial: Sequence[StageResult] = ()
    ) -> SearchResult:
        inc = state.incumbent
        assert inc is not None
        return SearchResult(
            method=self.config.name,
            candidate=inc.candidate,
            loss=inc.loss,
            fitness=inc.fitness,
            stop_reason=reason,
            evaluations=state.evaluations,
            held_out_evaluations=state.held_out_evaluations,
            nonfinite_evaluations=state.nonfinite,
            held_out_loss=inc.held_out,
            stages=(*state.stages, *partial),
            history=tuple(state.history),
        )
