"""`evomerge demo`: Evo-Merging against its baselines on the embedded service, end to end, on one machine.

`run_demo(DemoConfig(...))` builds (or loads from the disk cache) the embedded repository, starts the
embedded merge service on a free loopback port, and scores, on an out-of-domain target of a stratified
pool, every row of the comparison through the service:

* Evo-Merging: the default search (`DEFAULT`, or the preset `DemoConfig.preset` names), sized to the
  LoRAHub-style row's spend so the two searches compare at equal cost, under a hard token budget;
* best single adapter (chosen on validation), uniform merge, Task Arithmetic (a lambda grid), and a
  LoRAHub-style single-stage search (800 full validation passes), all black-box through the same
  service;
* TIES and DARE, white-box: they need the adapters' weights, so they run on the repository directly
  (hyper-parameters chosen on validation loss); their query and token counts are what the same
  evaluations would cost through the service.

Each row is scored on the target's test examples (never seen by any selection) and reports the queries
(service evaluations) and tokens it spent, counted by its own `Scheduler`. The result goes to an
output folder as `result.json` (vectors, metrics, spend, config, seed) and `convergence.png` (best
validation loss against the examples each search scored), and the Evo-Merging merge is materialized there
as an .npz. The same config gives the same result (timings aside).
"""

from __future__ import annotations

import functools
import math
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread
import attrs
import numpy as np

from .._io import write_json_atomic
from .._validators import (
    as_path,
    folder,
    non_negative_int,
    optional_path,
    optional_positive_int,
    positive_int,
)
from ..engine._baselines import best_single, lorahub, task_arithmetic, uniform_merge
from ..engine._config import PRESETS, SearchConfig, known_preset
from ..engine._planning import fit_to_queries
from ..engine._search import EvoMerge, Progress, SearchResult
from ..errors import ConfigError
from ..local import whitebox
from ..local.model import ModelWeights
from ..local.repository import Repository, RepositoryConfig, Target, build_repository
from ..local.repository_backend import preset_id
from ..local.server import LocalService
from ..local.tasks import Examples
from ..objectives.output import ScoringProgress
from ..objectives.service import ServiceObjective
from ..scheduler import Budget, MetricsSnapshot, Scheduler
from ..service import MergeServiceClient
from ._result import (
    EVO,
    LORAHUB_ROW,
    RESULT_FORMAT,
    CurvePoint,
    DemoRow,
    judge,
    write_plot,
)

__all__ = [
    "DemoConfig",
    "DemoResult",
    "PlainReporter",
    "Reporter",
    "SilentReporter",
    "describe_progress",
    "describe_search",
    "pick_target",
    "quick_search_config",
    "run_demo",
    "run_demo_async",
]

_FULL_BUDGET = 8_000_000
_QUICK_BUDGET = 2_000_000


@attrs.frozen
class DemoConfig:
    """What the demo runs. `seed` draws the pool and seeds every search (and DARE's masks); the
    repository is built from `repository_seed`. The two search rows compare at equal cost:
    `search_evaluations` is what each may spend, in full validation passes (default 800, the LoRAHub-style
    preset's; 300 in quick mode). LoRAHub-style runs that many evaluations; the Evo-Merging row's preset is
    sized to the same number of examples scored (`engine.fit_to_queries`). `budget_tokens` is a hard cap
    on each search row on top (default 8M, 2M in quick mode). `quick` shrinks the spend (not the pool) so
    the whole demo takes well under a minute. `preset` names the engine preset of the Evo-Merging row.
    `cache_dir` is the repository cache (default: `evomerge_sdk.local.default_cache_dir()`);
    `response_cache` an optional SQLite file the searches' evaluations are cached in across runs.
    """

    seed: int = attrs.field(default=0, validator=non_negative_int)
    pool_size: int = attrs.field(default=20, validator=positive_int)
    target: str | None = None
    budget_tokens: int | None = attrs.field(default=None, validator=optional_positive_int)
    quick: bool = False
    out_dir: Path = attrs.field(default=Path("evomerge-out"), converter=as_path, validator=folder)
    repository_seed: int = attrs.field(default=0, validator=non_negative_int)
    preset: str = attrs.field(default="default", validator=known_preset)
    search_evaluations: int | None = attrs.field(default=None, validator=optional_positive_int)
    cache_dir: Path | None = attrs.field(default=None, converter=optional_path, validator=folder)
    response_cache: Path | None = attrs.field(default=None, converter=optional_path)
    plot: bool = True

    @property
    def budget(self) -> int:
        """The token budget of each search row."""
        if self.budget_tokens is not None:
            return self.budget_tokens
        return _QUICK_BUDGET if self.quick else _FULL_BUDGET

    @property
    def search_budget(self) -> int:
        """Each search row's spend in full validation passes (LoRAHub's 800; 300 in quick mode)."""
        if self.search_evaluations is not None:
            return self.search_evaluations
        return 300 if self.quick else 800

    def search_config(self, n: int, examples: int, held_out: int) -> SearchConfig:
        """The Evo-Merging row's search: the preset with this seed, sized to `search_budget` full passes
        over `examples` validation examples for `n` models."""
        config = attrs.evolve(PRESETS[self.preset], seed=self.seed)
        return fit_to_queries(config, n, examples, self.search_budget * examples, held_out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the machine-specific paths (so two runs compare equal)."""
        return {
            "seed": self.seed,
            "pool_size": self.pool_size,
            "target": self.target,
            "budget_tokens": self.budget,
            "quick": self.quick,
            "repository_seed": self.repository_seed,
            "preset": self.preset,
            "search_evaluations": self.search_budget,
        }


def quick_search_config(config: SearchConfig) -> SearchConfig:
    """`config` with its stage budgets cut for a fast run (stage 1: 100, stage 2: 400 evaluations)."""
    denoise = None if config.denoise is None else attrs.evolve(config.denoise, max_evaluations=100)
    scale = None if config.scale is None else attrs.evolve(config.scale, max_evaluations=400)
    return attrs.evolve(config, denoise=denoise, scale=scale)


@attrs.frozen(eq=False)
class DemoResult:
    """What the demo found and where it wrote it."""

    config: DemoConfig
    target: str
    pool: tuple[str, ...]
    rows: tuple[DemoRow, ...]
    evo: SearchResult
    lorahub: SearchResult
    document: Mapping[str, Any]
    result_path: Path
    plot_path: Path | None
    timings: Mapping[str, float]

    def row(self, name: str) -> DemoRow:
        """A row by name."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)


class Reporter(Protocol):
    """Where the demo reports progress (the CLI shows it live; tests pass a silent one)."""

    def phase(self, text: str) -> None:
        """A new step begins."""

    def search(self, row: str, progress: Progress, spent_tokens: int, budget_tokens: int) -> None:
        """A search finished a generation."""

    def scoring(self, task: str, progress: ScoringProgress) -> None:
        """A scoring pass (output mode) scored another prompt."""

    def close(self) -> None:
        """The demo is over."""


class SilentReporter:
    """Reports nothing."""

    def phase(self, text: str) -> None:
        """Ignore."""

    def search(self, row: str, progress: Progress, spent_tokens: int, budget_tokens: int) -> None:
        """Ignore."""

    def scoring(self, task: str, progress: ScoringProgress) -> None:
        """Ignore."""

    def close(self) -> None:
        """Ignore."""


class PlainReporter:
    """Plain lines on a stream (no terminal control): one per step, searches at most every `interval` s."""

    def __init__(self, stream: Any = None, interval: float = 1.0) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.interval = interval
        self._last = -math.inf

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def phase(self, text: str) -> None:
        """Print the step."""
        self._print(text)
        self._last = -math.inf

    def search(self, row: str, progress: Progress, spent_tokens: int, budget_tokens: int) -> None:
        """Print the search's state, throttled."""
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        self._print(f"  {describe_progress(row, progress, spent_tokens, budget_tokens)}")

    def scoring(self, task: str, progress: ScoringProgress) -> None:
        """Print the pass's state, throttled (and its last prompt)."""
        now = time.monotonic()
        if now - self._last < self.interval and progress.done < progress.total:
            return
        self._last = now
        self._print(f"  {describe_scoring(task, progress)}")

    def close(self) -> None:
        """Nothing to release."""


def describe_search(config: SearchConfig) -> str:
    """E.g. "two-stage search (default preset)": what the Evo-Merging row runs, for its progress line."""
    kind = "two-stage" if len(config.stages()) == 2 else "one-stage"
    return f"{kind} search ({config.name} preset)"


def describe_progress(row: str, progress: Progress, spent_tokens: int, budget_tokens: int) -> str:
    """One line: row, stage, generation, best loss, spend against budget (a search on cached scores,
    which has no budget and spends nothing, says so)."""
    head = (
        f"{row}: stage {progress.stage}, generation {progress.generation}, "
        f"{progress.evaluations} evaluations, best loss {progress.best_loss:.4f}, "
    )
    if not budget_tokens:
        return head + f"spent {spent_tokens:,} tokens" + (" (cached scores)" if not spent_tokens else "")
    share = 100.0 * spent_tokens / budget_tokens
    return head + f"spent {spent_tokens:,} / {budget_tokens:,} tokens ({share:.1f}%)"


def describe_scoring(task: str, progress: ScoringProgress) -> str:
    """One line: a scoring pass's prompts scored, cache hits and tokens paid."""
    return (
        f"{task}: {progress.done:,} / {progress.total:,} prompts scored ({progress.cached:,} from cache), "
        f"{progress.tokens:,} tokens"
    )


# -- the run ---------------------------------------------------------------------------------------
def pick_target(repository: Repository, name: str | None) -> Target:
    """The named target ("ood:re/law" or "re/law"), or the repository's first out-of-domain target."""
    targets = repository.targets()
    if name is None:
        for t in targets:
            if t.kind == "ood":
                return t
        raise ConfigError("the repository has no out-of-domain target; name one with --target")
    for t in targets:
        if name in (t.name, t.task.name):
            return t
    raise ConfigError(f"unknown target {name!r}; the repository has {[t.name for t in targets]}")


def _row_spend(metrics: MetricsSnapshot) -> tuple[int, int, int]:
    return metrics.succeeded, metrics.tokens_in + metrics.tokens_out, metrics.cache_hits


async def run_demo_async(config: DemoConfig, reporter: Reporter | None = None) -> DemoResult:
    """Run the demo (see the module doc) and write its output folder."""
    rep = reporter if reporter is not None else SilentReporter()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rep.phase("Loading the embedded repository (built once, then cached on disk)...")
    t = time.perf_counter()
    repository = await anyio.to_thread.run_sync(
        build_repository, RepositoryConfig(seed=config.repository_seed), config.cache_dir
    )
    timings["repository_seconds"] = time.perf_counter() - t
    target = pick_target(repository, config.target)
    if config.pool_size > len(repository.adapter_names) - 1:
        raise ConfigError(f"pool_size must be at most {len(repository.adapter_names) - 1}")
    rows: list[DemoRow] = []
    # The client reserves each evaluation as examples x this bound: the longest example of this world.
    per_example = 1 + max(
        int(ex.lengths.max()) for t in repository.targets() for ex in (t.validation, t.holdout, t.test)
    )
    async with LocalService(
        repository, pool_sizes=(config.pool_size,), pool_seed=config.seed, output_dir=out
    ) as service:
        pid = preset_id(target.name, config.pool_size)
        async with (
            Scheduler(cache=False) as measure_scheduler,
            MergeServiceClient(
                service.url, scheduler=measure_scheduler, tokens_per_example=per_example
            ) as measure,
        ):
            sessions = {
                split: await measure.create_session(pid, query_plus={"dataset": f"{target.name}:{split}"})
                for split in ("validation", "held_out", "test")
            }
            n = sessions["validation"].adapter_count
            pool = service.repository.pool(target, config.pool_size, config.seed)
            examples = len(target.validation)
            search_config = config.search_config(n, examples, len(target.holdout))
            rep.phase(
                f"Embedded service on {service.url}: target {target.name} (out-of-domain), pool of {n} "
                f"adapters (seed {config.seed}); each search may score {config.search_budget * examples:,} "
                f"examples ({config.search_budget} validation passes), capped at {config.budget:,} tokens"
            )

            async def test_row(
                name: str, result: SearchResult, spend: tuple[int, int, int], **extra: Any
            ) -> DemoRow:
                ev = await measure.evaluate(sessions["test"], result.alpha, result.beta)
                merged = await anyio.to_thread.run_sync(repository.merge, pool, result.alpha, result.beta)
                return DemoRow(
                    correct=await anyio.to_thread.run_sync(_correct, repository, merged, target.test),
                    name=name,
                    test_accuracy=float(ev.accuracy or 0.0),
                    test_macro_f1=float(ev.macro_f1 or 0.0),
                    test_loss=ev.loss,
                    validation_loss=result.loss,
                    queries=spend[0],
                    tokens=spend[1],
                    cache_hits=spend[2],
                    alpha=tuple(result.alpha.tolist()),
                    beta=tuple(result.beta.tolist()),
                    stop_reason=result.stop_reason.value,
                    **extra,
                )

            async def in_row(
                budget: int | None,
                cache_name: str,
                run: Callable[[ServiceObjective, Scheduler], Awaitable[SearchResult]],
            ) -> tuple[SearchResult, tuple[int, int, int]]:
                cache: bool | Path = True
                if config.response_cache is not None:
                    cache = config.response_cache
                scheduler = Scheduler(budget=None if budget is None else Budget(tokens=budget), cache=cache)
                async with (
                    scheduler,
                    MergeServiceClient(
                        service.url,
                        scheduler=scheduler,
                        cache_namespace=cache_name,
                        tokens_per_example=per_example,
                    ) as client,
                ):
                    objective = ServiceObjective(client, sessions["validation"], sessions["held_out"])
                    value = await run(objective, scheduler)
                    return value, _row_spend(scheduler.metrics())

            curves: dict[str, list[CurvePoint]] = {}

            def on_progress(
                row: str, objective: ServiceObjective, scheduler: Scheduler, budget: int
            ) -> Callable[[Progress], None]:
                curve = curves.setdefault(row, [])

                def report(progress: Progress) -> None:
                    curve.append(CurvePoint(progress.stage, objective.examples_scored, progress.best_loss))
                    rep.search(row, progress, scheduler.spent().tokens, budget)

                return report

            # Evo-Merging
            rep.phase(f"{EVO}: {describe_search(search_config)}, sized to the same spend, seed {config.seed}")
            t = time.perf_counter()

            async def run_evo(obj: ServiceObjective, s: Scheduler) -> SearchResult:
                report = on_progress(EVO, obj, s, config.budget)
                return await EvoMerge(obj, n, search_config, on_progress=report).run()

            evo, spend = await in_row(config.budget, "evo", run_evo)
            timings["evo_seconds"] = time.perf_counter() - t
            rows.append(await test_row(EVO, evo, spend))

            # Static black-box baselines
            for name, baseline in (
                ("best single adapter", best_single),
                ("uniform", uniform_merge),
                ("Task Arithmetic", task_arithmetic),
            ):
                rep.phase(f"{name} (through the service)")

                async def run_static(
                    obj: ServiceObjective, s: Scheduler, b: Callable[..., Awaitable[SearchResult]] = baseline
                ) -> SearchResult:
                    return await b(obj, n)

                result, spend = await in_row(None, name, run_static)
                rows.append(await test_row(name, result, spend))

            # White-box TIES and DARE, on the weights
            vectors = await anyio.to_thread.run_sync(whitebox.TaskVectors, repository, pool)
            per_eval = sessions["validation"].tokens_per_evaluation
            for method, label in (("ties", "TIES"), ("dare", "DARE")):
                rep.phase(f"{label} (white-box: on the weights, grid chosen on validation loss)")
                tune = functools.partial(whitebox.tune, vectors, method, target.validation, seed=config.seed)
                tuned = await anyio.to_thread.run_sync(tune)
                test = await anyio.to_thread.run_sync(repository.evaluate, tuned.weights, target.test)
                grid = len(whitebox.default_grid(method, len(pool)))
                rows.append(
                    DemoRow(
                        name=label,
                        test_accuracy=test.accuracy,
                        test_macro_f1=test.macro_f1,
                        test_loss=test.loss,
                        validation_loss=tuned.validation.loss,
                        queries=grid,
                        tokens=grid * per_eval,
                        whitebox=True,
                        params=dict(tuned.params),
                        correct=await anyio.to_thread.run_sync(
                            _correct, repository, tuned.weights, target.test
                        ),
                    )
                )

            # LoRAHub-style
            rep.phase(
                f"{LORAHUB_ROW}: one-stage search, {config.search_budget} evaluations, seed {config.seed}"
            )
            t = time.perf_counter()

            async def run_lorahub(obj: ServiceObjective, s: Scheduler) -> SearchResult:
                report = on_progress(LORAHUB_ROW, obj, s, config.budget)
                return await lorahub(
                    obj, n, max_evaluations=config.search_budget, seed=config.seed, on_progress=report
                )

            hub, spend = await in_row(config.budget, "lorahub", run_lorahub)
            timings["lorahub_seconds"] = time.perf_counter() - t
            rows.append(await test_row(LORAHUB_ROW, hub, spend))
            materialized = await measure.materialize(
                sessions["validation"], evo.alpha, evo.beta, tag="evo-merging"
            )
    timings["total_seconds"] = time.perf_counter() - started
    rows_t = tuple(rows)
    fingerprint = await anyio.to_thread.run_sync(repository.fingerprint)
    document = _document(
        config, search_config, target, pool, rows_t, evo, hub, Path(materialized.path).name, fingerprint
    )
    document["timing"] = {k: round(v, 3) for k, v in timings.items()}
    result_path = out / "result.json"
    await anyio.to_thread.run_sync(write_json_atomic, result_path, document)
    plot_path = None
    if config.plot:
        plot_path = out / "convergence.png"
        await anyio.to_thread.run_sync(write_plot, plot_path, curves, rows_t, target.name, config)
    rep.close()
    return DemoResult(
        config=config,
        target=target.name,
        pool=tuple(pool),
        rows=rows_t,
        evo=evo,
        lorahub=hub,
        document=document,
        result_path=result_path,
        plot_path=plot_path,
        timings=timings,
    )


def run_demo(config: DemoConfig | None = None, reporter: Reporter | None = None) -> DemoResult:
    """Run the demo in a fresh event loop (see `run_demo_async`)."""
    return anyio.run(run_demo_async, config or DemoConfig(), reporter)


def _correct(repository: Repository, weights: ModelWeights, examples: Examples) -> str:
    """Per test prompt, "1" where the merged model's most likely answer is right: what the verdict pairs."""
    scores = repository.answer_logprobs(weights, examples)
    predicted = examples.answer_ids[np.argmax(scores, axis=1)]
    return "".join("1" if ok else "0" for ok in predicted == examples.labels)


def _document(
    config: DemoConfig,
    search_config: SearchConfig,
    target: Target,
    pool: Sequence[str],
    rows: Sequence[DemoRow],
    evo: SearchResult,
    hub: SearchResult,
    materialized: str,
    fingerprint: str,
) -> dict[str, Any]:
    best = max(rows, key=lambda r: r.test_accuracy)
    judged = judge(rows)
    import aiohttp

    return {
        "format": RESULT_FORMAT,
        "version": 1,
        "seed": config.seed,
        "config": config.to_dict(),
        "search_config": search_config.to_dict(),
        "target": {"name": target.name, "kind": target.kind, "specialist_in_pool": target.specialist in pool},
        "preset_id": preset_id(target.name, config.pool_size),
        "pool": list(pool),
        "rows": [r.to_dict() for r in rows],
        "best_row": best.name,
        # A win only when this case's own paired interval says so (see `judge`).
        "evo_merging_beats_every_row": judged.outcome == "win",
        "verdict": judged.to_dict(),
        "world_fingerprint": fingerprint,
        "evo_merging": evo.to_dict(),
        "lorahub": hub.to_dict(),
        "materialized": materialized,
        "spend": {
            "budget_tokens_per_search": config.budget,
            "rows": {r.name: {"queries": r.queries, "tokens": r.tokens} for r in rows},
        },
        "notes": [
            "Test metrics are on the target's held-out test examples, never seen by any selection.",
            "TIES and DARE are white-box: they read the adapters' weights and run on the repository, "
            "not through the service; their queries and tokens are what the same evaluations would "
            "cost through it.",
        ],
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "aiohttp": aiohttp.__version__,
        },
    }
