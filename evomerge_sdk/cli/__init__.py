"""The `evomerge` command: a thin argument parser over the SDK.

    evomerge demo [--quick] [--seed N] [--pool-size N] [--target NAME] [--budget TOKENS] [--out DIR]
    evomerge serve-local [--port N] [--rpm N] [--tpm N] [--error-rate P] [--latency S] [--drop-rate P]
    evomerge demo --mode output [--quick] [--reference base|mean] ...   (output-space merging)
    evomerge serve RESULT.json [--host H] [--port N] [--api-key K] [--base-url URL] [--budget TOKENS] ...
    evomerge --version

One parser (`build_parser`); each subcommand is a module of its own (`_demo`, `_serve`, `_serve_local`)
with `HELP`, `add_arguments` and `run`, listed in `COMMANDS`, so more can be added without touching
`main`. `rich` and `matplotlib` (the `cli` extra) are imported only by the commands that draw.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..errors import EvomergeError
from . import _demo, _serve, _serve_local

__all__ = ["COMMANDS", "main"]


def _configure_logging(verbose: int) -> None:
    """Log to stderr through `logging` (stdout stays for results): the SDK's warnings by default, info
    with -v, debug with -vv; other libraries stay at warnings. The SDK's events reach `logging` through
    structlog's stdlib integration (see `evomerge_sdk._logs`)."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    if not any(getattr(h, "evomerge_cli", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("evomerge %(levelname)s %(name)s: %(message)s"))
        handler.evomerge_cli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    logging.getLogger("evomerge_sdk").setLevel(level)


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "demo": (_demo.HELP, _demo.add_arguments, _demo.run),
    "serve": (_serve.HELP, _serve.add_arguments, _serve.run),
    "serve-local": (_serve_local.HELP, _serve_local.add_arguments, _serve_local.run),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="evomerge", description="Black-box merging of LLMs reachable only through APIs (Evo-Merging)."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
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
