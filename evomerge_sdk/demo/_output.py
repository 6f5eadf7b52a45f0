"""`evomerge demo --mode output`: output-space Evo-Merging over an OpenAI-compatible route.

The embedded service serves the base model and every adapter on its OpenAI-compatible
`POST /v1/chat/completions`. The demo talks to it exactly as to any LMaaS, through the real OpenAI
adapter (`evomerge_openai`, found by its entry point) and the `Scheduler`:

1. scoring pass: every pool adapter and the reference ("base") answers each validation and held-out
   prompt once (`max_tokens=1`, `logprobs`, `top_logprobs=20`), cached;
2. search: the default search on the cached score tensor (`OutputSpaceObjective`): no query at all;
3. baselines on the same cached scores: best single adapter (by validation accuracy), uniform (the pool
   mean), the base model, a LoRAHub-style one-stage search;
4. test: every model answers the target's test prompts once; each row's test accuracy and macro-F1.

The spend table shows the queries and tokens of each phase, measured by the scheduler: the search's
row is 0. `result.json` holds the rows, the spend and the merged model (`merged_model`), which
`evomerge serve result.json` serves as an OpenAI-compatible endpoint.
"""

from __future__ import annotations

import functools
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
import numpy as np

from .._io import write_json_atomic
from .._validators import (
    as_path,
    folder,
    must,
    non_negative_int,
    optional_path,
    optional_positive_int,
    positive_int,
)
from ..engine._baselines import best_single, lorahub, uniform_merge
from ..engine._config import PRESETS, SearchConfig, known_preset
from ..engine._objective import Candidate, EvaluationContext, Split
from ..engine._planning import fit_to_queries
from ..engine._search import EvoMerge, Progress, SearchResult
from ..local.repository import Repository, RepositoryConfig, Target, build_repository
from ..local.server import LocalService
from ..local.tasks import Examples
from ..merged.spec import MergedSpec
from ..objectives.output import (
    AnswerSet,
    LabelledExamples,
    OutputScores,
    OutputSpaceObjective,
    ScoreTable,
    ScoringConfig,
    ScoringProgress,
    collect_scores,
    plan_scoring,
)
from ..providers import Provider, Usage, load_provider
from ..report import write_convergence_png
from ..scheduler import Budget, MetricsSnapshot, Scheduler
from ._provider import Reporter, SilentReporter, describe_search, pick_target, quick_search_config
from ._result import EVO, LORAHUB_ROW, DemoRow

__all__ = [
    "OUTPUT_RESULT_FORMAT",
    "OutputDemoConfig",
    "OutputDemoResult",
    "SpendRow",
    "format_spend",
    "labelled",
    "run_output_demo",
    "run_output_demo_async",
]

OUTPUT_RESULT_FORMAT = "evomerge-sdk/demo-output-result"
BEST_SINGLE = "best single adapter"
UNIFORM = "uniform (pool mean)"
BASE = "base model"
PRUNED = "Evo-Merging, pruned"
_VALIDATION = EvaluationContext(Split.VALIDATION, "prune", 0, 0)
_QUICK_TEST = 300


@attrs.frozen
class OutputDemoConfig:
    """What the output-mode demo runs. `reference` is "base" (the embedded base model) or "mean" (the
    pool mean). `test_examples` caps the test prompts (default all; 300 in quick mode); `quick` also
    cuts the search budgets. `response_cache` is an optional SQLite file, so a re-run queries nothing.
    `small_repository` uses the tiny test repository (`RepositoryConfig.small`). `budget_tokens` is a
    hard cap on every token the demo's queries spend (a scoring pass it cannot pay for fails before it
    sends anything, saying how much it needs); `search_evaluations` sizes both searches (Evo-Merging's
    preset fitted to it, LoRAHub-style's budget; default 800, quick 300)."""

    seed: int = attrs.field(default=0, validator=non_negative_int)
    pool_size: int = attrs.field(default=20, validator=positive_int)
    target: str | None = None
    quick: bool = False
    out_dir: Path = attrs.field(default=Path("evomerge-out"), converter=as_path, validator=folder)
    repository_seed: int = attrs.field(default=0, validator=non_negative_int)
    preset: str = attrs.field(default="default", validator=known_preset)
    reference: str = attrs.field(
        default="base",
        validator=must(lambda v: v in ("base", "mean"), "reference must be 'base' or 'mean', got {value!r}"),
    )
    test_examples: int | None = attrs.field(default=None, validator=optional_positive_int)
    cache_dir: Path | None = attrs.field(default=None, converter=optional_path, validator=folder)
    response_cache: Path | None = attrs.field(default=None, converter=optional_path)
    max_concurrency: int = attrs.field(default=16, validator=positive_int)
    small_repository: bool = False
    budget_tokens: int | None = attrs.field(default=None, validator=optional_positive_int)
    search_evaluations: int | None = attrs.field(default=None, validator=optional_positive_int)

    def repository_config(self) -> RepositoryConfig:
        """The embedded repository this demo runs on."""
        if self.small_repository:
            return RepositoryConfig.small(self.repository_seed)
        return RepositoryConfig(seed=self.repository_seed)

    @property
    def test_limit(self) -> int | None:
        """Test prompts scored (None: all)."""
        if self.test_examples is not None:
            return self.test_examples
        return _QUICK_TEST if self.quick else None

    @property
    def lorahub_evaluations(self) -> int:
        """The LoRAHub-style search's evaluations."""
        if self.search_evaluations is not None:
            return self.search_evaluations
        return 300 if self.quick else 800

    def search_config(self, n: int | None = None) -> SearchConfig:
        """The Evo-Merging search: the preset with this seed, every evaluation on the whole split
        (smaller budgets in quick mode; fitted to `search_evaluations` on `n` models when set).

        Minibatches save queries; here the search runs on cached scores and costs none, so they would
        only add noise to the ranking.
        """
        config = attrs.evolve(PRESETS[self.preset], seed=self.seed)
        config = attrs.evolve(
            config,
            denoise=None if config.denoise is None else attrs.evolve(config.denoise, batch_size=None),
            scale=None if config.scale is None else attrs.evolve(config.scale, batch_size=None),
        )
        if self.search_evaluations is not None and n is not None:
            # One "query" per evaluation: with whole-split stages and no held-out split counted, the
            # planner counts evaluations.
            return fit_to_queries(config, n, 1, self.search_evaluations)
        return quick_search_config(config) if self.quick else config

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without machine-specific paths."""
        return {
            "mode": "output",
            "seed": self.seed,
            "pool_size": self.pool_size,
            "target": self.target,
            "quick": self.quick,
            "repository_seed": self.repository_seed,
            "preset": self.preset,
            "reference": self.reference,
            "test_examples": self.test_limit,
            "small_repository": self.small_repository,
            "budget_tokens": self.budget_tokens,
            "search_evaluations": self.lorahub_evaluations,
        }


@attrs.frozen
class SpendRow:
    """What one phase of the demo sent: requests answered by the service, cache hits, tokens."""

    phase: str
    queries: int
    cache_hits: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return attrs.asdict(self)


@attrs.frozen(eq=False)
class OutputDemoResult:
    """What the output-mode demo found and where it wrote it."""

    config: OutputDemoConfig
    target: str
    pool: tuple[str, ...]
    rows: tuple[DemoRow, ...]
    spend: tuple[SpendRow, ...]
    evo: SearchResult
    spec: MergedSpec
    document: Mapping[str, Any]
    result_path: Path
    plot_path: Path

    def row(self, name: str) -> DemoRow:
        """A row by name."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def phase(self, name: str) -> SpendRow:
        """A spend row by phase name."""
        for s in self.spend:
            if s.phase == name:
                return s
        raise KeyError(name)


def labelled(repository: Repository, examples: Examples, limit: int | None = None) -> LabelledExamples:
    """The embedded repository's examples as text prompts with gold answers over its answer set."""
    tokens = repository.tokenizer.tokens
    options = AnswerSet(tuple(tokens[int(i)] for i in examples.answer_ids))
    n = len(examples) if limit is None else min(limit, len(examples))
    answers = [tokens[int(i)] for i in examples.labels[:n]]
    return LabelledExamples.of(list(examples.prompts[:n]), answers, options)


async def _best_single_by_accuracy(objective: OutputSpaceObjective, validation: OutputScores) -> SearchResult:
    """The single adapter with the best validation accuracy (ties: lower loss); a stronger baseline than
    the lowest validation loss, which on out-of-domain targets favours confidently wrong adapters."""
    n = validation.n_models
    by_loss = await best_single(objective, n)  # the engine's baseline: its result record and loss
    eye = np.eye(n)
    ranked = []
    for i in range(n):
        m = validation.metrics(np.ones(n), eye[i])
        ranked.append((-m["accuracy"], m["loss"], i))
    _, loss, best = min(ranked)
    candidate = Candidate(np.ones(n), eye[best])
    return attrs.evolve(by_loss, candidate=candidate, loss=loss, fitness=loss)


def _scoring(rep: Reporter, split: str) -> Callable[[ScoringProgress], None]:
    """A scoring pass's progress, to the reporter."""
    task = f"scoring {split.replace('_', '-')}"

    def on_progress(progress: ScoringProgress) -> None:
        rep.scoring(task, progress)

    return on_progress


def _delta(before: MetricsSnapshot, after: MetricsSnapshot, phase: str) -> SpendRow:
    tokens = (after.tokens_in + after.tokens_out) - (before.tokens_in + before.tokens_out)
    return SpendRow(phase, after.succeeded - before.succeeded, after.cache_hits - before.cache_hits, tokens)


async def run_output_demo_async(
    config: OutputDemoConfig, reporter: Reporter | None = None
) -> OutputDemoResult:
    """Run the output-mode demo (see the module doc) and write `result.json`."""
    rep = reporter if reporter is not None else SilentReporter()
    started = time.perf_counter()
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rep.phase("Loading the embedded repository (built once, then cached on disk)...")
    repository = await anyio.to_thread.run_sync(
        build_repository, config.repository_config(), config.cache_dir
    )
    target = pick_target(repository, config.target)
    pool = repository.pool(target, config.pool_size, config.seed)
    search_config = config.search_config(len(pool))
    reference = "base" if config.reference == "base" else "mean"
    models = [*pool, "base"]
    splits = {
        "validation": labelled(repository, target.validation),
        "held_out": labelled(repository, target.holdout),
        "test": labelled(repository, target.test, config.test_limit),
    }
    scoring = ScoringConfig(method="logprobs", top_logprobs=20)
    cache: bool | Path = config.response_cache if config.response_cache is not None else True
    spend: list[SpendRow] = []
    async with (
        LocalService(repository, pool_sizes=(config.pool_size,), pool_seed=config.seed) as service,
        Scheduler(
            max_concurrency=config.max_concurrency,
            cache=cache,
            timeout=120.0,
            budget=None if config.budget_tokens is None else Budget(tokens=config.budget_tokens),
        ) as scheduler,
    ):
        provider: Provider = load_provider("openai", base_url=f"{service.url}/v1")
        try:
            rep.phase(
                f"Embedded service on {service.url}/v1 (OpenAI-compatible): target {target.name} "
                f"({target.kind}), {len(pool)} adapters + base, reference: {config.reference}"
            )
            # Money before queries: the demo's every request is planned, shown and checked first.
            plans = [await plan_scoring(scheduler, provider, models, splits[s], scoring) for s in splits]
            planned = {m: sum((p.get(m, Usage()) for p in plans), Usage()) for m in models}
            requests = len(models) * sum(len(e) for e in splits.values())
            worst = sum(u.input_tokens + u.output_tokens for u in planned.values())
            cap = "" if config.budget_tokens is None else f", budget {config.budget_tokens:,} tokens"
            rep.phase(f"Planned: {requests:,} requests, at most {worst:,} tokens (cache hits are free){cap}")
            scheduler.check_affordable(planned, f"the demo's scoring ({requests:,} requests)")
            rep.phase(
                f"Scoring pass: {len(models)} models x {len(splits['validation']) + len(splits['held_out'])} "
                "validation and held-out prompts, one request each (logprobs, top 20)"
            )
            before = scheduler.metrics()
            tables: dict[str, ScoreTable] = {}
            for split in ("validation", "held_out"):
                tables[split] = await collect_scores(
                    scheduler, provider, models, splits[split], scoring, on_progress=_scoring(rep, split)
                )
            spend.append(_delta(before, scheduler.metrics(), "scoring pass (validation + held-out)"))
            scores = {s: t.select(pool, reference) for s, t in tables.items()}
            objective = OutputSpaceObjective(scores["validation"], scores["held_out"])
            n = len(pool)

            def report(row: str) -> Callable[[Progress], None]:
                def on_progress(progress: Progress) -> None:
                    rep.search(row, progress, 0, 0)  # the search spends nothing

                return on_progress

            search = describe_search(search_config)
            rep.phase(f"{EVO} (output space): {search} on the cached scores, seed {config.seed}")
            before = scheduler.metrics()
            evo = await EvoMerge(objective, n, search_config, on_progress=report(EVO)).run()
            pruned_candidate = objective.prune(evo.candidate)
            pruned_loss = (await objective([pruned_candidate], _VALIDATION))[0]
            pruned = attrs.evolve(evo, candidate=pruned_candidate, loss=pruned_loss, fitness=pruned_loss)
            spend.append(
                _delta(before, scheduler.metrics(), f"search ({evo.evaluations} evaluations) and pruning")
            )
            rep.phase("Baselines on the same cached scores")
            before = scheduler.metrics()
            single = await _best_single_by_accuracy(objective, scores["validation"])
            uniform = await uniform_merge(objective, n)
            hub = await lorahub(
                objective,
                n,
                max_evaluations=config.lorahub_evaluations,
                seed=config.seed,
                on_progress=report(LORAHUB_ROW),
            )
            spend.append(
                _delta(before, scheduler.metrics(), "baselines (best single, uniform, LoRAHub-style)")
            )
            rep.phase(f"Test: {len(models)} models x {len(splits['test'])} test prompts, one request each")
            before = scheduler.metrics()
            test = await collect_scores(
                scheduler, provider, models, splits["test"], scoring, on_progress=_scoring(rep, "test")
            )
            spend.append(_delta(before, scheduler.metrics(), "test scoring (evaluation only)"))
        finally:
            await provider.aclose()
    test_scores = test.select(pool, reference)
    base_val = tables["validation"].of("base")
    scoring_spend = spend[0]
    rows: list[DemoRow] = []

    def row(name: str, result: SearchResult, queries: int, tokens: int) -> DemoRow:
        m = test_scores.metrics(result.alpha, result.beta)
        return DemoRow(
            name=name,
            test_accuracy=m["accuracy"],
            test_macro_f1=m["macro_f1"],
            test_loss=m["loss"],
            validation_loss=result.loss,
            queries=queries,
            tokens=tokens,
            alpha=tuple(result.alpha.tolist()),
            beta=tuple(result.beta.tolist()),
            stop_reason=result.stop_reason.value,
        )

    q, tk = scoring_spend.queries, scoring_spend.tokens
    rows.append(row(EVO, evo, q, tk))
    rows.append(row(PRUNED, pruned, q, tk))
    rows.append(row(BEST_SINGLE, single, q, tk))
    rows.append(row(UNIFORM, uniform, q, tk))
    rows.append(row(LORAHUB_ROW, hub, q, tk))
    base_test = test.of("base")
    from ..objectives.metrics import accuracy, cross_entropy, macro_f1

    labels_val = splits["validation"].labels
    labels_test = splits["test"].labels
    rows.append(
        DemoRow(
            name=BASE,
            test_accuracy=accuracy(base_test, labels_test),
            test_macro_f1=macro_f1(base_test, labels_test),
            test_loss=cross_entropy(base_test, labels_test),
            validation_loss=cross_entropy(base_val, labels_val),
            queries=0,
            tokens=0,
        )
    )
    spec = MergedSpec(
        mode="output",
        pool=pool,
        alpha=pruned.alpha,
        beta=pruned.beta,
        source={
            "kind": "embedded",
            "repository_seed": config.repository_seed,
            "small_repository": config.small_repository,
            "pool_seed": config.seed,
            "pool_size": config.pool_size,
        },
        reference=reference,
        answer_set=splits["validation"].answer_set.options,
        scoring=scoring,
        name="evomerge-output-merged",
    )
    document = _document(config, search_config, target, pool, rows, spend, evo, spec, scores["validation"])
    document["timing"] = {"total_seconds": round(time.perf_counter() - started, 3)}
    result_path = out / "result.json"
    await anyio.to_thread.run_sync(write_json_atomic, result_path, document)
    plot_path = out / "convergence.png"
    # The best single adapter's loss is often far above the rest (confidently wrong out of domain): the
    # table has it; the plot keeps the scale of the searches.
    curves = {EVO: evo, LORAHUB_ROW: hub, UNIFORM: uniform}
    title = f"output space: {target.name}, pool {len(pool)}, seed {config.seed}"
    await anyio.to_thread.run_sync(functools.partial(write_convergence_png, curves, plot_path, title=title))
    rep.close()
    return OutputDemoResult(
        config=config,
        target=target.name,
        pool=tuple(pool),
        rows=tuple(rows),
        spend=tuple(spend),
        evo=evo,
        spec=spec,
        document=document,
        result_path=result_path,
        plot_path=plot_path,
    )


def run_output_demo(
    config: OutputDemoConfig | None = None, reporter: Reporter | None = None
) -> OutputDemoResult:
    """Run the output-mode demo in a fresh event loop."""
    return anyio.run(run_output_demo_async, config or OutputDemoConfig(), reporter)


def _document(
    config: OutputDemoConfig,
    search_config: SearchConfig,
    target: Target,
    pool: Sequence[str],
    rows: Sequence[DemoRow],
    spend: Sequence[SpendRow],
    evo: SearchResult,
    spec: MergedSpec,
    validation: OutputScores,
) -> dict[str, Any]:
    import aiohttp

    others = [r for r in rows if r.name not in (EVO, PRUNED)]
    evo_row = rows[0]
    return {
        "format": OUTPUT_RESULT_FORMAT,
        "version": 1,
        "seed": config.seed,
        "config": config.to_dict(),
        "search_config": search_config.to_dict(),
        "target": {"name": target.name, "kind": target.kind, "specialist_in_pool": target.specialist in pool},
        "pool": list(pool),
        "rows": [r.to_dict() for r in rows],
        "evo_merging_beats_best_single": evo_row.test_accuracy
        > next(r.test_accuracy for r in rows if r.name == BEST_SINGLE),
        "evo_merging_beats_every_row": all(evo_row.test_accuracy > r.test_accuracy for r in others),
        "evo_merging": evo.to_dict(),
        "evo_merging_pruned": {"alpha": list(spec.alpha), "beta": list(spec.beta)},
        "active_models": list(spec.active),
        "spend": [s.to_dict() for s in spend],
        "merged_model": spec.to_dict(),
        "notes": [
            "Every model answered each validation, held-out and test prompt once through the embedded "
            "service's OpenAI-compatible route (logprobs, top 20); searches and baselines ran on the "
            "cached scores and sent no request.",
            "Row queries/tokens are the shared scoring pass every selected row needs; the base row "
            "selects nothing, so it needs none.",
            "The served merged model (merged_model) is the Evo-Merging merge pruned on validation: models "
            "whose removal costs at most 0.5% validation loss get alpha = beta = 0 and are never queried.",
            "Scores: log-probability of each option's token; options outside the top 20 get the floor "
            "min(lowest listed logprob, log(unlisted mass / unlisted options)).",
        ],
        "validation_examples": int(validation.labels.size),
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "aiohttp": aiohttp.__version__,
        },
    }


def format_spend(spend: Sequence[SpendRow]) -> str:
    """The spend table as Markdown."""
    lines = ["| phase | queries | cache hits | tokens |", "| --- | ---: | ---: | ---: |"]
    for s in spend:
        lines.append(f"| {s.phase} | {s.queries:,} | {s.cache_hits:,} | {s.tokens:,} |")
    return "\n".join(lines)
