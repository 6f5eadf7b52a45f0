"""`evomerge serve-local`: the embedded merge service, with its limits and fault injection."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ._args import API_KEY_ENV, non_negative_int, positive_int

HELP = "serve the embedded merge service (the protocol, chat completions, limits, faults)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=non_negative_int, default=8080, help="port (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help=f"address (non-loopback needs ${API_KEY_ENV})")
    p.add_argument("--rpm", type=float, default=None, help="requests per minute, answered with 429 beyond")
    p.add_argument("--tpm", type=float, default=None, help="tokens per minute, answered with 429 beyond")
    p.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 500/503")
    p.add_argument("--rate-limit-rate", type=float, default=0.0, help="share of requests answered 429")
    p.add_argument("--drop-rate", type=float, default=0.0, help="share of connections dropped after work")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every billable request")
    p.add_argument("--fault-seed", type=int, default=0, help="seed of the fault decisions")
    p.add_argument("--pool-sizes", type=positive_int, nargs="+", default=[5, 20, 100], help="preset sizes")
    p.add_argument("--pool-seed", type=non_negative_int, default=0, help="seed of the presets' pools")
    p.add_argument("--repository-seed", type=non_negative_int, default=0, help="embedded repository seed")
    p.add_argument("--small", action="store_true", help="a tiny repository (for tests; builds instantly)")
    p.add_argument("--max-sessions", type=positive_int, default=64, help="open sessions at most")
    p.add_argument("--output-dir", default=None, help="where materialized merges go (default: a temp dir)")
    p.add_argument("--reference-only", action="store_true", help="only the reference routes and fields")


def run(args: argparse.Namespace) -> int:
    import anyio

    from ..local.faults import FaultConfig, ServerLimits
    from ..local.repository import RepositoryConfig
    from ..local.server import LocalService, serve

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
