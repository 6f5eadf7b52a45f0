"""One worker process of a fleet that shares an API key's limits, budget and cache through Redis.

Started by the shared-coordination tests and by `benchmarks/redis.py`:

    python tests/scheduler/_redis_worker.py --url http://127.0.0.1:PORT --redis redis://127.0.0.1:6379/0 \
        --namespace NS --callers 200 [--budget TOKENS] [--rpm RPM] [--duration S] [--requests N] \
        [--same-prompts] [--cache] [--lease S] [--local]

Each of `--callers` callers sends chat requests through one `Scheduler(shared=RedisCoordination(...))`
and the real `evomerge-openai` adapter until its budget is refused, the coordinator is lost,
`--duration` seconds have passed, or it has sent `--requests`. `--local` runs the same callers on an
in-process scheduler (no Redis), for the benchmark's comparison. It prints `{"ready": true}` once its
scheduler is open, starts when it reads a line on stdin (so a fleet starts together), and prints one
JSON line with what its callers saw at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any

import anyio
import attrs
from evomerge_openai import OpenAIProvider

from evomerge_sdk.errors import BudgetExceeded, CoordinationLost
from evomerge_sdk.providers import ChatRequest
from evomerge_sdk.scheduler import Budget, RedisCoordination, RetryPolicy, Scheduler

MODEL = "gpt-4o-mini"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line above."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--namespace", required=True)
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--callers", type=int, default=200)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--rpm", type=float, default=None)
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--same-prompts", action="store_true")
    p.add_argument("--cache", action="store_true")
    p.add_argument("--lease", type=float, default=10.0)
    p.add_argument("--local", action="store_true")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the callers; return what they saw."""
    shared = None
    if not args.local:
        shared = RedisCoordination(
            args.redis, namespace=args.namespace, lease=args.lease, timeout=args.lease / 4
        )
    scheduler = Scheduler(
        max_concurrency=args.callers,
        rpm=args.rpm,
        budget=Budget(tokens=args.budget) if args.budget else None,
        cache=args.cache,
        retry=RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.01, max_retry_after=1.0),
        shared=shared,
    )
    provider = OpenAIProvider(base_url=f"{args.url}/v1", api_key="sk-redis-worker-0123456789abcdef")
    seen: Counter[str] = Counter()
    errors: list[str] = []

    until = float("inf")

    async def caller(i: int) -> None:
        k = 0
        while time.perf_counter() < until and (args.requests is None or k < args.requests):
            who = "" if args.same_prompts else f"worker {args.worker} "
            request = ChatRequest(
                model=MODEL, messages=f"{who}caller {i} asks question {k}", max_tokens=args.max_tokens
            )
            k += 1
            try:
                await scheduler.complete(provider, request)
            except BudgetExceeded:
                seen["budget"] += 1
                return
            except CoordinationLost as exc:
                seen["lost"] += 1
                errors.append(str(exc))
                return
            except Exception as exc:  # reported, so the test names what went wrong
                seen[type(exc).__name__] += 1
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            seen["ok"] += 1

    t0 = t1 = 0.0
    async with scheduler, provider:
        print(json.dumps({"ready": True}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # "go"
        t0 = time.perf_counter()
        if args.duration is not None:
            until = t0 + args.duration
        async with anyio.create_task_group() as tg:
            for i in range(args.callers):
                tg.start_soon(caller, i)
        t1 = time.perf_counter()
    m = scheduler.metrics()
    return {
        "worker": args.worker,
        "seen": dict(seen),
        "errors": errors[:5],
        "wall_seconds": t1 - t0,
        "requests": m.requests,
        "cache_hits": m.cache_hits,
        "dedup_hits": m.dedup_hits,
        "rate_limited": m.rate_limited,
        "spent": attrs.asdict(scheduler.spent()),
    }


def main() -> None:
    """Run one worker and print its JSON summary last."""
    print(json.dumps(anyio.run(run, parse())), flush=True)


if __name__ == "__main__":
    main()
