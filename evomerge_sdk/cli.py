"""The `evomerge` command: a thin argument parser over the SDK.

    evomerge demo [--quick] [--seed N] [--pool-size N] [--target NAME] [--budget TOKENS] [--out DIR]
    evomerge serve-local [--port N] [--rpm N] [--tpm N] [--error-rate P] [--latency S] [--drop-rate P]
    evomerge demo --mode output [--quick] [--reference base|mean] ...   (output-space merging)
    evomerge serve RESULT.json [--host H] [--port N] [--api-key K] [--base-url URL]

Subcommands live in `COMMANDS` (name -> (help, add_arguments, run)), so more can be added without touching
`main`. `rich` and `matplotlib` (the `cli` extra) are imported only by the commands that draw.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import CLI_EXTRA_HINT, ConfigError, EvomergeError

__all__ = ["COMMANDS", "main"]

API_KEY_ENV = "EVOMERGE_API_KEY"


def _configure_logging(verbose: int) -> None:
    """Log to stderr: warnings by default, info with -v, debug with -vv (stdout stays for results)."""
    import structlog

    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _require_cli_extra(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"this command needs {', '.join(missing)}: {CLI_EXTRA_HINT}")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# -- demo ------------------------------------------------------------------------------------------
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small search budgets: the demo in under a minute")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="pool draw and search seed (default 0)")
    p.add_argument("--pool-size", type=_positive_int, default=20, help="adapters in the pool (default 20)")
    p.add_argument("--target", default=None, help="target, e.g. ood:re/law (default: the first OOD target)")
    p.add_argument(
        "--budget", type=_positive_int, default=None, help="token budget per search (default 8M, quick 2M)"
    )
    p.add_argument("--out", default="evomerge-out", help="output folder (default ./evomerge-out)")
    p.add_argument("--preset", default="default", help="engine preset of the Evo-Merging row (default)")
    p.add_argument(
        "--search-evaluations",
        type=_positive_int,
        default=None,
        help="each search row's spend in validation passes, equal for both rows (800, quick 300)",
    )
    p.add_argument("--repository-seed", type=_non_negative_int, default=0, help="embedded repository seed")
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
        self.progress.start()

    def phase(self, text: str) -> None:
        self.progress.console.print(text)

    def search(self, row: str, progress: Any, spent_tokens: int, budget_tokens: int) -> None:
        task = self.tasks.get(row)
        if task is None:
            task = self.tasks[row] = self.progress.add_task(row, total=budget_tokens, spend="")
        self.progress.update(
            task,
            completed=spent_tokens,
            description=(
                f"{row}: {progress.stage}, gen {progress.generation}, best loss {progress.best_loss:.4f}"
            ),
            spend=f"{spent_tokens:,} / {budget_tokens:,} tokens",
        )

    def close(self) -> None:
        self.progress.stop()


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a pipe or a CI log: room for the table rather than 80 columns
        console = Console(width=max(console.width, 100))
    return console


def _rows_table(title: str, caption: str, rows: Sequence[Any]) -> Any:
    """The demos' comparison: one row per method, the best test accuracy in green, Evo-Merging in bold."""
    from rich.table import Table

    from .demo import EVO

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


def _run_demo(args: argparse.Namespace) -> int:
    if args.mode == "output":
        _require_cli_extra("rich")
        return _run_output_demo(args)
    _require_cli_extra("rich", "matplotlib")
    from .demo import DemoConfig, PlainReporter, Reporter, run_demo, verdict

    config = DemoConfig(
        **_demo_settings(args), budget_tokens=args.budget, search_evaluations=args.search_evaluations
    )
    console = _console()
    reporter: Reporter
    if args.no_progress or not console.is_terminal:
        reporter = PlainReporter(sys.stdout)
    else:
        reporter = _RichReporter(console)
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
    where = [str(result.result_path)] + ([str(result.plot_path)] if result.plot_path else [])
    console.print("Wrote " + " and ".join(where))
    return 0


def _run_output_demo(args: argparse.Namespace) -> int:
    """`evomerge demo --mode output`: run, then print what it found."""
    from .demo import PlainReporter
    from .demo_output import OutputDemoConfig, run_output_demo

    config = OutputDemoConfig(**_demo_settings(args), reference=args.reference)
    console = _console()
    _print_output_demo(console, run_output_demo(config, PlainReporter(sys.stdout)))
    return 0


def _print_output_demo(console: Any, result: Any) -> None:
    """The output-mode demo's comparison, its spend by phase, and the verdict against the best single."""
    from rich.table import Table

    from .demo import EVO
    from .demo_output import BEST_SINGLE

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
    console.print(f"Wrote {result.result_path} (serve it: evomerge serve {result.result_path})")


# -- serve-local -----------------------------------------------------------------------------------
def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=_non_negative_int, default=8080, help="port (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help=f"address (non-loopback needs ${API_KEY_ENV})")
    p.add_argument("--rpm", type=float, default=None, help="requests per minute, answered with 429 beyond")
    p.add_argument("--tpm", type=float, default=None, help="tokens per minute, answered with 429 beyond")
    p.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 500/503")
    p.add_argument("--rate-limit-rate", type=float, default=0.0, help="share of requests answered 429")
    p.add_argument("--drop-rate", type=float, default=0.0, help="share of connections dropped after work")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every billable request")
    p.add_argument("--fault-seed", type=int, default=0, help="seed of the fault decisions")
    p.add_argument("--pool-sizes", type=_positive_int, nargs="+", default=[5, 20, 100], help="preset sizes")
    p.add_argument("--pool-seed", type=_non_negative_int, default=0, help="seed of the presets' pools")
    p.add_argument("--repository-seed", type=_non_negative_int, default=0, help="embedded repository seed")
    p.add_argument("--small", action="store_true", help="a tiny repository (for tests; builds instantly)")
    p.add_argument("--max-sessions", type=_positive_int, default=64, help="open sessions at most")
    p.add_argument("--output-dir", default=None, help="where materialized merges go (default: a temp dir)")
    p.add_argument("--reference-only", action="store_true", help="only the reference routes and fields")


def _run_serve(args: argparse.Namespace) -> int:
    import anyio

    from .local.faults import FaultConfig, ServerLimits
    from .local.repository import RepositoryConfig
    from .local.server import LocalService, serve

    faults = FaultConfig(
        seed=args.fault_seed,
        error_rate=args.error_rate,
        rate_limit_rate=args.rate_limit_rate,
        drop_rate=args.drop_rate,
        latency=args.latency,
    )
    limits = ServerLimits(rpm=args.rpm, tpm=args.tpm) if args.rpm or args.tpm else None
    config = (
        RepositoryConfig.small(args.repository_seed)
        if args.small
        else RepositoryConfig(seed=args.repository_seed)
    )
    service = LocalService(
        repository_config=config,
        host=args.host,
        port=args.port,
        api_key=os.environ.get(API_KEY_ENV) or None,
        limits=limits,
        faults=faults if faults.active else None,
        pool_sizes=args.pool_sizes,
        pool_seed=args.pool_seed,
        max_sessions=args.max_sessions,
        output_dir=args.output_dir,
        reference_only=args.reference_only,
    )

    def announce(info: dict[str, Any]) -> None:
        print(json.dumps(info), flush=True)
        print(
            f"evomerge: serving the embedded merge service on {info['url']} (Ctrl-C stops)", file=sys.stderr
        )

    anyio.run(lambda: serve(service, announce=announce))
    return 0


# -- serve (a merged model) ------------------------------------------------------------------------
def _serve_merged_arguments(p: argparse.ArgumentParser) -> None:
    from .serve import add_cli_arguments

    add_cli_arguments(p)


def _run_serve_merged(args: argparse.Namespace) -> int:
    from .serve import run_cli

    return run_cli(args)


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "demo": (
        "Evo-Merging against its baselines on the embedded service: table, result.json, convergence.png",
        _demo_arguments,
        _run_demo,
    ),
    "serve": (
        "serve a merged model (RESULT.json of `evomerge demo`, or a saved merged model) as an "
        "OpenAI-compatible /v1/chat/completions endpoint",
        _serve_merged_arguments,
        _run_serve_merged,
    ),
    "serve-local": (
        "serve the embedded merge service (the protocol, chat completions, limits, faults)",
        _serve_arguments,
        _run_serve,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="evomerge", description="Black-box merging of LLMs reachable only through APIs (Evo-Merging)."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `evomerge` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return COMMANDS[args.command][2](args)
    except EvomergeError as exc:
        print(f"evomerge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
