"""`evomerge serve RESULT.json`: a merged model behind an OpenAI-compatible endpoint, its upstream calls
bounded (budget, rate limits, concurrency, timeout, cache size)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..providers import Provider
from ._args import API_KEY_ENV, positive_int

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
        help="where the models are (OpenAI-compatible /v1 URL, or the merge service); default: the URL "
        "the merged model records, or the embedded service it came from",
    )
    p.add_argument("--upstream-api-key", default=None, help="API key for --base-url")
    p.add_argument(
        "--providers",
        default=None,
        help="JSON file naming each model's provider, for a pool spread over several APIs: "
        '{"MODEL": {"provider": "openai"|"anthropic", "base_url": URL, "api_key_env": VAR}, ...}',
    )
    p.add_argument("--model-name", default=None, help="the model name clients ask for")
    p.add_argument("--budget", type=positive_int, default=None, help="cap on upstream tokens (then 429)")
    p.add_argument("--rpm", type=float, default=None, help="upstream requests per minute at most")
    p.add_argument("--tpm", type=float, default=None, help="upstream tokens per minute at most")
    p.add_argument("--max-concurrency", type=positive_int, default=16, help="upstream calls in flight (16)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per upstream request (60; then 504)")
    p.add_argument(
        "--cache-entries", type=positive_int, default=10_000, help="answers cached in memory (10,000)"
    )


def load_providers_file(path: str | os.PathLike[str]) -> dict[str, Provider]:
    """The providers a `--providers` file names, one per model (keys come from environment variables the
    file names, never from the file)."""
    from ..providers import load_provider

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read the providers file {path}: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path} must be a JSON object mapping model names to {{provider, base_url}}")
    out: dict[str, Provider] = {}
    for model, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("provider"), str):
            raise ConfigError(f"{path}: {model!r} needs an object with a provider name")
        unknown = set(entry) - {"provider", "base_url", "api_key_env"}
        if unknown:
            raise ConfigError(f"{path}: {model!r} has unknown fields {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        if entry.get("base_url") is not None:
            kwargs["base_url"] = entry["base_url"]
        env = entry.get("api_key_env")
        if env is not None:
            if not isinstance(env, str) or not os.environ.get(env):
                raise ConfigError(f"{path}: {model!r} takes its key from ${env}, which is not set")
            kwargs["api_key"] = os.environ[env]
        out[model] = load_provider(entry["provider"], **kwargs)
    return out


def run(args: argparse.Namespace) -> int:
    """`evomerge serve RESULT.json`: serve until Ctrl-C; prints one JSON line with the URL on stdout."""
    import anyio

    from ..merged import MergedModelServer, load_spec, open_merged, serve_merged
    from ..scheduler import Budget, ResponseCache, Scheduler

    spec = load_spec(args.result)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    providers = load_providers_file(args.providers) if args.providers else None
    scheduler = Scheduler(
        max_concurrency=args.max_concurrency,
        rpm=args.rpm,
        tpm=args.tpm,
        budget=Budget(tokens=args.budget) if args.budget is not None else None,
        cache=ResponseCache(max_memory_entries=args.cache_entries),
        timeout=args.timeout,
    )

    async def main() -> None:
        try:
            async with (
                scheduler,
                open_merged(
                    spec,
                    base_url=args.base_url,
                    upstream_api_key=args.upstream_api_key,
                    scheduler=scheduler,
                    providers=providers,
                ) as merged,
            ):
                server = MergedModelServer(
                    merged, host=args.host, port=args.port, api_key=api_key, model_name=args.model_name
                )

                def announce(info: dict[str, Any]) -> None:
                    print(json.dumps(info), flush=True)
                    asked = len(spec.queried_models()) if spec.mode == "output" else 1
                    mode = "parameter" if spec.mode == "provider" else spec.mode  # the docs' word
                    print(
                        f"evomerge: serving {info['model']} ({mode} mode) on {info['base_url']}; each "
                        f"request sends {asked} upstream quer{'y' if asked == 1 else 'ies'} (Ctrl-C stops)",
                        file=sys.stderr,
                    )

                await serve_merged(server, announce=announce)
        finally:
            for provider in (providers or {}).values():
                await provider.aclose()

    anyio.run(main)
    return 0
