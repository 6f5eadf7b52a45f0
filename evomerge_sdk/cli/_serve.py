"""`evomerge serve RESULT.json`: a merged model behind an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ._args import API_KEY_ENV

HELP = (
    "serve a merged model (RESULT.json of `evomerge demo`, or a saved merged model) as an "
    "OpenAI-compatible /v1/chat/completions endpoint"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `evomerge serve`."""
    p.add_argument("result", help="result.json of `evomerge demo` (either mode) or a saved merged model")
    p.add_argument("--host", default="127.0.0.1", help="address (non-loopback needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; default 8000)")
    p.add_argument("--api-key", default=None, help="require this bearer token (default: $EVOMERGE_API_KEY)")
    p.add_argument(
        "--base-url",
        default=None,
        help="where the models are (OpenAI-compatible /v1 URL, or the merge service); "
        "default: start the embedded service when the result came from it",
    )
    p.add_argument("--upstream-api-key", default=None, help="API key for --base-url")
    p.add_argument("--model-name", default=None, help="the model name clients ask for")


def run(args: argparse.Namespace) -> int:
    """`evomerge serve RESULT.json`: serve until Ctrl-C; prints one JSON line with the URL on stdout."""
    import anyio

    from ..merged import MergedModelServer, load_spec, open_merged, serve_merged

    spec = load_spec(args.result)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None

    async def main() -> None:
        async with open_merged(
            spec, base_url=args.base_url, upstream_api_key=args.upstream_api_key
        ) as merged:
            server = MergedModelServer(
                merged, host=args.host, port=args.port, api_key=api_key, model_name=args.model_name
            )

            def announce(info: dict[str, Any]) -> None:
                print(json.dumps(info), flush=True)
                print(
                    f"evomerge: serving {info['model']} ({spec.mode} mode) on {info['base_url']} "
                    "(Ctrl-C stops)",
                    file=sys.stderr,
                )

            await serve_merged(server, announce=announce)

    anyio.run(main)
    return 0
