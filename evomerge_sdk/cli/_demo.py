"""`evomerge demo`: Evo-Merging against its baselines, in either mode, drawn with rich."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._args import non_negative_int, positive_int, require_cli_extra

if TYPE_CHECKING:
    from ..demo import Reporter

HELP = "Evo-Merging against its baselines on the embedded service: table, result.json, convergence.png"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small search budgets: the demo in under a minute")
    p.add_argument("--seed", type=non_negative_int, default=0, help="pool draw and search seed (default 0)")
    p.add_argument("--pool-size", type=positive_int, default=20, help="adapters in the pool (default 20)")
    p.add_argument("--target", default=None, help="target, e.g. ood:re/law (default: the first OOD target)")
    p.add_argument(
        "--budget",
        type=positive_int,
        default=None,
        help="hard token cap: per search in parameter mode (default 8M, quick 2M); on every query in "
        "output mode (default none; a budget too small fails before the first request, naming the need)",
    )
    p.add_argument("--out", default="evomerge-out", help="output folder (default ./evomerge-out)")
    p.add_argument("--preset", default="default", help="engine preset of the Evo-Merging row (default)")
    p.add_argument(
        "--search-evaluations",
        type=positive_int,
        default=None,
        help="each search row's spend in validation passes, equal for both rows (800, quick 300)",
    )
    p.add_argument("--repository-seed", type=non_negative_int, default=0, help="embedded repository seed")
    p.add_argument("--cache", default=None, help="SQLite file caching evaluations across runs")
    p.add_argument(
        "--no-progress", action="store_true", help="plain progress lines instead of a live display"
    )
    p.add_argument(
        "--mode",
        choices=("parameter", "output"),
        default="parameter",
        help="parameter: the service merges LoRA weights (default); output: merge the models' answer scores",
    )
    p.add_argument(
        "--reference", choices=("base", "mean"), default="base", help="output mode: reference model (base)"
    )


class _RichReporter:
    """Live progress with rich: one bar per search (tokens spent against the budget), steps above it."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[spend]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.tasks: dict[str, Any] = {}
        self._current: Any = None
        self.progress.start()

    def phase(self, text: str) -> None:
        # A live line with the time spent so far, until the next phase: no step sits silent.
        self.progress.console.print(text)
        if self._current is not None:
            self.progress.remove_task(self._current)
        self._current = self.progress.add_task("working", total=None, spend="")

    def search(self, row: str, progress: Any, spent_tokens: int, budget_tokens: int) -> None:
        task = self.tasks.get(row)
        if task is None:
            task = self.tasks[row] = self.progress.add_task(row, total=budget_tokens or None, spend="")
        # No budget: a search on cached scores (output mode), which sends nothing.
        spend = f"{spent_tokens:,} / {budget_tokens:,} tokens" if budget_tokens else "0 queries (cached)"
        self.progress.update(
            task,
            completed=spent_tokens if budget_tokens else progress.evaluations,
            description=(
                f"{row}: {progress.stage}, gen {progress.generation}, best loss {progress.best_loss:.4f}"
            ),
            spend=spend,
        )

    def scoring(self, task: str, progress: Any) -> None:
        bar = self.tasks.get(task)
        if bar is None:
            bar = self.tasks[task] = self.progress.add_task(task, total=progress.total, spend="")
        self.progress.update(
            bar,
            completed=progress.done,
            description=f"{task}: {progress.done:,} / {progress.total:,} prompts, {progress.cached:,} cached",
            spend=f"{progress.tokens:,} tokens",
        )

    def close(self) -> None:
        self.progress.stop()


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a pipe or a CI log: room for the table rather than 80 columns
        console = Console(width=max(console.width, 100))
    return console


def _reporter(args: argparse.Namespace, console: Any) -> Reporter:
    """Progress for either demo: rich's live bars on a terminal, plain lines when piped (a log file
    full of redraw codes is unreadable) or with --no-progress."""
    from ..demo import PlainReporter

    if args.no_progress or not console.is_terminal:
        return PlainReporter(sys.stdout)
    return _RichReporter(console)


def _rows_table(title: str, caption: str, rows: Sequence[Any]) -> Any:
    """The demos' comparison: one row per method, the best test accuracy in green, Evo-Merging in bold."""
    from rich.table import Table

    from ..demo import EVO

    best = max(r.test_accuracy for r in rows)
    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("method", no_wrap=True)
    for header in ("test acc %", "test macro-F1 %", "val loss", "queries", "tokens"):
        table.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        style = "bold green" if r.test_accuracy == best else ("bold" if r.name == EVO else None)
        table.add_row(
            r.name + (" †" if r.whitebox else ""),
            f"{100 * r.test_accuracy:.1f}",
            f"{100 * r.test_macro_f1:.1f}",
            f"{r.validation_loss:.4f}",
            f"{r.queries:,}",
            f"{r.tokens:,}",
            style=style,
        )
    return table


def _title(target: str, pool: int, config: Any) -> str:
    # The Evo-Merging row runs `config.preset`: name it when it is not the default.
    preset = "" if config.preset == "default" else f", Evo-Merging row: preset {config.preset}"
    return f"{target}, pool of {pool}, seed {config.seed}{preset}" + (" (quick)" if config.quick else "")


def _demo_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags both demo modes read, as config fields."""
    return {
        "seed": args.seed,
        "pool_size": args.pool_size,
        "target": args.target,
        "quick": args.quick,
        "out_dir": args.out,
        "repository_seed": args.repository_seed,
        "preset": args.preset,
        "response_cache": args.cache,
    }


def run(args: argparse.Namespace) -> int:
    if args.mode == "output":
        require_cli_extra("rich")
        return _run_output_demo(args)
    require_cli_extra("rich", "matplotlib")
    from ..demo import DemoConfig, run_demo, verdict

    config = DemoConfig(
        **_demo_settings(args), budget_tokens=args.budget, search_evaluations=args.search_evaluations
    )
    console = _console()
    reporter = _reporter(args, console)
    try:
        result = run_demo(config, reporter)
    finally:
        reporter.close()
    caption = (
        "Test metrics on held-out test examples; queries = service evaluations, tokens = processed by "
        "the service. † white-box: reads the adapters' weights and runs on the repository directly; "
        "its counts are what the same evaluations would cost through the service."
    )
    title = _title(result.target, len(result.pool), config)
    console.print(_rows_table(title, caption, result.rows))
    console.print(verdict(result.rows))
    console.print(
        f"World fingerprint {result.document['world_fingerprint']}: the embedded repository this machine "
        "built; BLAS kernels differ between CPUs, so single-case numbers compare only between equal "
        "fingerprints."
    )
    where = [str(result.result_path)] + ([str(result.plot_path)] if result.plot_path else [])
    console.print("Wrote " + " and ".join(where))
    return 0


def _run_output_demo(args: argparse.Namespace) -> int:
    """`evomerge demo --mode output`: run, then print what it found."""
    from ..demo import OutputDemoConfig, run_output_demo

    config = OutputDemoConfig(
        **_demo_settings(args),
        reference=args.reference,
        budget_tokens=args.budget,
        search_evaluations=args.search_evaluations,
    )
    console = _console()
    reporter = _reporter(args, console)
    try:
        result = run_output_demo(config, reporter)
    finally:
        reporter.close()
    _print_output_demo(console, result)
    return 0


def _print_output_demo(console: Any, result: Any) -> None:
    """The output-mode demo's comparison, its spend by phase, and the verdict against the best single."""
    from rich.table import Table

    from ..demo import BEST_SINGLE, EVO

    config = result.config
    title = "output space: " + _title(result.target, len(result.pool), config)
    caption = "Test metrics on held-out test prompts. Queries/tokens: the scoring pass a row needs."
    console.print(_rows_table(title, caption, result.rows))
    spend = Table(title="spend by phase (measured by the scheduler)")
    spend.add_column("phase", no_wrap=True)
    for header in ("queries", "cache hits", "tokens"):
        spend.add_column(header, justify="right", no_wrap=True)
    for s in result.spend:
        spend.add_row(s.phase, f"{s.queries:,}", f"{s.cache_hits:,}", f"{s.tokens:,}")
    console.print(spend)
    evo, single = result.row(EVO), result.row(BEST_SINGLE)
    word = "beats" if evo.test_accuracy > single.test_accuracy else "does NOT beat"
    console.print(
        f"{EVO} (output space) {word} the best single adapter on test accuracy "
        f"({100 * evo.test_accuracy:.1f} vs {100 * single.test_accuracy:.1f}); it reads "
        f"{len(result.spec.active)} of {len(result.pool)} adapters once pruned; its search sent "
        f"{result.spend[1].queries} queries."
    )
    console.print(
        f"Wrote {result.result_path} and {result.plot_path} (serve it: evomerge serve {result.result_path})"
    )
