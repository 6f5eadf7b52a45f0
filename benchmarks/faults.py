"""Determinism under faults: the same seeded search through a healthy and through a faulty merge service.

The embedded service (default 110-adapter repository) serves an out-of-domain target's pool; the SDK's
default two-stage search runs through `ServiceObjective` once against a healthy service and once per
fault seed against a service injecting the issue's mix per request: 10% 500/503, 5% 429 with
Retry-After, 2% hangs (the client's per-request timeout fires and the request is retried), 1% dropped
connections (after the work was done: the service served it, the client never saw the answer) and 1%
malformed JSON bodies. The claim: the faulty runs end with exactly the same vectors, loss and history.

    python benchmarks/faults.py --quick     # pool 20, 300 evaluations, one fault seed (< 60 s)
    python benchmarks/faults.py             # pools 20 and 100, 1,000 evaluations, fault seeds 0 1 2

The last line printed is one JSON object: `identical` (every faulty run equals its healthy run),
`requests` and `retries` (summed over the faulty runs, as the client's scheduler counted them),
`faults_injected` (as the services counted them), the final loss, and per-run details in full mode.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from typing import Any

import aiohttp
import anyio
import attrs
import numpy as np
import structlog

from evomerge_sdk.engine import EvoMerge, SearchConfig, SearchResult, preset
from evomerge_sdk.local import preset_id
from evomerge_sdk.local.faults import FaultConfig
from evomerge_sdk.local.repository import Repository, build_repository
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.objectives import ServiceObjective
from evomerge_sdk.scheduler import RetryPolicy, Scheduler
from evomerge_sdk.service import MergeServiceClient

TARGET = "ood:ner/news"
REQUEST_TIMEOUT = 1.0  # seconds before a hung request is abandoned and retried
RETRY = RetryPolicy(max_attempts=8, base_delay=0.005, max_delay=0.1, max_retry_after=2.0, seed=0)


def issue_faults(seed: int) -> FaultConfig:
    """The issue's fault mix (per request), seeded."""
    return FaultConfig(
        seed=seed,
        error_rate=0.10,
        rate_limit_rate=0.05,
        retry_after=0.05,
        hang_rate=0.02,
        hang_seconds=60.0,
        drop_rate=0.01,
        malformed_rate=0.01,
    )


def search_config(evaluations: int) -> SearchConfig:
    """The two-stage preset with `evaluations` split 1:2 between the stages, no early stopping (a fixed
    amount of work, and both stages exercised)."""
    two = preset("two-stage")
    assert two.denoise is not None and two.scale is not None
    return attrs.evolve(
        two,
        denoise=attrs.evolve(two.denoise, max_evaluations=evaluations // 3),
        scale=attrs.evolve(two.scale, max_evaluations=evaluations - evaluations // 3),
        early_stopping=None,
        seed=7,
    )


async def one_run(
    repo: Repository, pool: int, config: SearchConfig, faults: FaultConfig | None
) -> dict[str, Any]:
    """One search through a fresh service; its result and what both ends counted."""
    started = time.perf_counter()
    async with LocalService(repo, pool_sizes=(pool,), faults=faults) as service:
        scheduler = Scheduler(max_concurrency=32, retry=RETRY, cache=False)
        async with (
            scheduler,
            MergeServiceClient(service.url, scheduler=scheduler, timeout=REQUEST_TIMEOUT) as client,
        ):
            session = await client.create_session(preset_id(TARGET, pool))
            result: SearchResult = await EvoMerge(ServiceObjective(client, session), pool, config).run()
        metrics = scheduler.metrics()
        return {
            "result": result.to_dict(),
            "loss": result.loss,
            "evaluations": result.evaluations,
            "requests": metrics.requests,
            "retries": metrics.retries,
            "failed": metrics.failed,
            "faults_injected": sum(service.stats.injected.values()),
            "faults_by_kind": dict(sorted(service.stats.injected.items())),
            "served_requests": service.stats.served_requests,
            "seconds": round(time.perf_counter() - started, 2),
        }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Every (pool, fault seed) pair against its healthy run."""
    repo = await anyio.to_thread.run_sync(build_repository)
    config = search_config(args.evaluations)
    runs = []
    for pool in args.pools:
        clean = await one_run(repo, pool, config, None)
        print(f"pool {pool}, healthy: loss {clean['loss']:.6f}, {clean['requests']} requests, "
              f"{clean['seconds']} s", flush=True)  # fmt: skip
        for seed in args.fault_seeds:
            noisy = await one_run(repo, pool, config, issue_faults(seed))
            same = noisy["result"] == clean["result"]
            print(
                f"pool {pool}, fault seed {seed}: identical={same}, loss {noisy['loss']:.6f}, "
                f"{noisy['requests']} requests, {noisy['retries']} retries, "
                f"faults {noisy['faults_by_kind']}, {noisy['seconds']} s",
                flush=True,
            )
            runs.append(
                {
                    "pool": pool,
                    "fault_seed": seed,
                    "identical": same,
                    "loss": noisy["loss"],
                    "healthy_loss": clean["loss"],
                    "evaluations": noisy["evaluations"],
                    "healthy_requests": clean["requests"],
                    **{k: noisy[k] for k in ("requests", "retries", "failed", "faults_injected",
                                             "faults_by_kind", "served_requests", "seconds")},
                }
            )  # fmt: skip
    return {
        "benchmark": "faults",
        "mode": "quick" if args.quick else "full",
        "identical": all(r["identical"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "retries": sum(r["retries"] for r in runs),
        "faults_injected": sum(r["faults_injected"] for r in runs),
        "loss": runs[-1]["loss"],
        "evaluations_per_run": runs[-1]["evaluations"],
        "runs": runs if not args.quick else None,
        "machine": f"{platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}, "
        f"aiohttp {aiohttp.__version__}",
    }


def main() -> None:
    """Parse the flags, run, print the JSON line last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pool 20, 300 evaluations, one fault seed")
    parser.add_argument("--pools", type=int, nargs="+", default=None, help="pool sizes (20 100)")
    parser.add_argument("--fault-seeds", type=int, nargs="+", default=None, help="fault seeds (0 1 2)")
    parser.add_argument("--evaluations", type=int, default=None, help="evaluations per search (1000)")
    args = parser.parse_args()
    # Retries are logged at INFO: keep stdout for the report (warnings still go to stderr).
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    if args.pools is None:
        args.pools = [20] if args.quick else [20, 100]
    if args.fault_seeds is None:
        args.fault_seeds = [0] if args.quick else [0, 1, 2]
    if args.evaluations is None:
        args.evaluations = 300 if args.quick else 1000
    report = anyio.run(main_async, args)
    print(json.dumps({k: v for k, v in report.items() if v is not None}))


if __name__ == "__main__":
    main()
