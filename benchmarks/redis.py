"""Shared-coordination benchmark: what `Scheduler(shared=RedisCoordination(...))` costs and whether a fleet
of worker processes keeps one RPM limit and one budget (issue 19).

Against the loopback echo server (a separate process speaking the OpenAI chat-completions wire format)
and the machine's Redis (127.0.0.1:6379, or `--redis`), all within one run:

- added_ms_per_request: one request at a time, the median over interleaved pairs of (latency through a
  scheduler sharing its limiter, budget and cache through Redis) minus (latency through an in-process
  scheduler with the same settings: rpm, budget, cache), the same kind of request (distinct prompts, so
  every one is a cache miss that is claimed, reserved, rate-limited, settled and stored);
  added_ms_per_request_concurrent: the same comparison at `--concurrency` callers, wall time per request
  (the script batching Redis does under load shows here), and added_cpu_ms_per_request: the CPU the
  shared path adds per request there (client process plus Redis server), which load does not blur;
- rpm_utilization_4_processes / server_429s: 4 worker processes x 200 callers share one RPM limit that
  the server also enforces with 429s (GCRA, 1 s of burst tolerance); utilisation is served requests over
  the configured rate across the span the server admitted them in;
- budget_overshoot_tokens_4_processes: 4 worker processes x 200 callers share one token budget, each
  caller sending until refused; the tokens the server served beyond it.

Usage:

    python benchmarks/redis.py --quick     # < 60 s
    python benchmarks/redis.py             # full mode

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

# This file is named redis.py, and Python puts its folder first on sys.path: take it off, or
# `import redis` (here and inside the SDK) would import this script instead of redis-py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import aiohttp  # noqa: E402
import anyio  # noqa: E402
import redis as redis_sync  # noqa: E402
import structlog  # noqa: E402

from evomerge_sdk import ChatRequest  # noqa: E402
from evomerge_sdk.scheduler import Budget, RedisCoordination, Scheduler  # noqa: E402
from evomerge_sdk.testing import EchoProvider  # noqa: E402

MODEL = "gpt-4o-mini"
MAX_TOKENS = 16
WORKER = Path(__file__).resolve().parents[1] / "tests" / "scheduler" / "_redis_worker.py"
HIGH_RPM = 600_000.0  # configured but never binding: the limiter's script runs, its waits are zero


@contextmanager
def echo_server(*args: str) -> Iterator[str]:
    """Start `python -m evomerge_sdk.testing.echo_server` with `args`; yield its URL; stop it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge_sdk.testing.echo_server", *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                yield json.loads(line)["url"]
                return
        raise RuntimeError("echo server did not start")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def namespace(url: str) -> Iterator[str]:
    """A fresh namespace, deleted afterwards."""
    name = f"bench-{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        client = redis_sync.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"evomerge:{{{name}}}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


async def stats(url: str, reset: bool = False) -> dict[str, Any]:
    """The echo server's accounting (and optionally reset it)."""
    async with aiohttp.ClientSession() as session:
        if reset:
            async with session.post(f"{url}/stats/reset") as r:
                await r.read()
            return {}
        async with session.get(f"{url}/stats") as r:
            data: dict[str, Any] = await r.json()
            return data


def request(tag: str, i: int) -> ChatRequest:
    """A distinct small chat request (a cache miss)."""
    return ChatRequest(
        model=MODEL, messages=f"{tag} question {i}: what is {i} plus {i}?", max_tokens=MAX_TOKENS
    )


def schedulers(redis_url: str, ns: str, concurrency: int) -> tuple[Scheduler, Scheduler]:
    """An in-process and a shared scheduler with the same limits, budget and cache."""
    settings: dict[str, Any] = {
        "max_concurrency": concurrency,
        "rpm": HIGH_RPM,
        "budget": Budget(tokens=10**12),
    }
    local = Scheduler(**settings)
    shared = Scheduler(**settings, shared=RedisCoordination(redis_url, namespace=ns))
    return local, shared


async def sequential(url: str, redis_url: str, n: int) -> dict[str, Any]:
    """Interleaved one-at-a-time requests through both schedulers: median added latency per request."""
    provider = EchoProvider(url, max_connections=2)
    lat: dict[str, list[float]] = {"local": [], "shared": []}
    with namespace(redis_url) as ns:
        local, shared = schedulers(redis_url, ns, 1)
        async with local, shared:
            for i in range(-30, n):  # the first 30 pairs warm both paths up
                order = (
                    (("local", local), ("shared", shared))
                    if i % 2
                    else (("shared", shared), ("local", local))
                )
                for name, s in order:
                    t0 = time.perf_counter()
                    await s.complete(provider, request(f"seq-{name}", i))
                    if i >= 0:
                        lat[name].append(time.perf_counter() - t0)
    await provider.aclose()
    local_med, shared_med = statistics.median(lat["local"]), statistics.median(lat["shared"])
    return {
        "added_ms_per_request": statistics.median(
            b - a for a, b in zip(lat["local"], lat["shared"], strict=True)
        )
        * 1e3,
        "difference_of_medians_ms": (shared_med - local_med) * 1e3,
        "local_latency_ms_p50": local_med * 1e3,
        "shared_latency_ms_p50": shared_med * 1e3,
        "shared_latency_ms_p95": sorted(lat["shared"])[int(0.95 * (n - 1))] * 1e3,
        "requests": n,
    }


def redis_cpu(redis_url: str) -> float:
    """CPU seconds the Redis server has used so far (user + system)."""
    info = redis_sync.Redis.from_url(redis_url).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def concurrent(url: str, redis_url: str, n: int, concurrency: int, repeats: int) -> dict[str, Any]:
    """Wall time of n requests at `concurrency` through both schedulers, alternating; per-request added.

    Also the CPU each request adds (this process's, plus the Redis server's), which a loaded machine
    does not blur the way it blurs wall time: the Redis server's share includes other clients' work
    during the run, so it is an upper bound.
    """
    provider = EchoProvider(url, max_connections=concurrency)
    walls: dict[str, list[float]] = {"local": [], "shared": []}
    cpus: dict[str, list[float]] = {"local": [], "shared": []}
    with namespace(redis_url) as ns:
        for r in range(-1, repeats):  # one warm-up round
            for name in ("local", "shared") if r % 2 else ("shared", "local"):
                local, shared = schedulers(redis_url, ns, concurrency)
                s = local if name == "local" else shared
                async with s:
                    c0, r0, t0 = time.process_time(), redis_cpu(redis_url), time.perf_counter()
                    async with anyio.create_task_group() as tg:
                        for i in range(n):
                            tg.start_soon(s.complete, provider, request(f"c{r}-{name}", i))
                    wall = time.perf_counter() - t0
                    cpu = time.process_time() - c0 + redis_cpu(redis_url) - r0
                if r >= 0:
                    walls[name].append(wall)
                    cpus[name].append(cpu)
    await provider.aclose()
    pairs = list(zip(walls["local"], walls["shared"], strict=True))
    return {
        "added_ms_per_request_concurrent": statistics.median((b - a) / n for a, b in pairs) * 1e3,
        "added_cpu_ms_per_request": statistics.median(
            (b - a) / n for a, b in zip(cpus["local"], cpus["shared"], strict=True)
        )
        * 1e3,
        "local_rps": n / statistics.median(walls["local"]),
        "shared_rps": n / statistics.median(walls["shared"]),
        "local_seconds": [round(w, 4) for w in walls["local"]],
        "shared_seconds": [round(w, 4) for w in walls["shared"]],
        "requests": n,
        "concurrency": concurrency,
    }


def fleet(url: str, redis_url: str, ns: str, *extra: str) -> list[dict[str, Any]]:
    """Run 4 worker processes x 200 callers together; their JSON summaries."""
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, str(WORKER), "--url", url, "--redis", redis_url, "--namespace", ns),
                *("--callers", "200", "--worker", str(i), *extra),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    try:
        for p in procs:  # every scheduler is open before any caller starts
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith('{"ready"'):
                raise RuntimeError(f"worker failed to start: {line!r}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        out = []
        for p in procs:
            stdout, _ = p.communicate(timeout=300)
            if p.returncode != 0:
                raise RuntimeError(f"worker exited with {p.returncode}: {stdout[-500:]}")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def rpm_fleet(url: str, redis_url: str, rpm: float, per_caller: int) -> dict[str, Any]:
    """4 processes x 200 callers, `per_caller` requests each, share one RPM limit that the server
    enforces: utilisation and 429s."""
    anyio.run(stats, url, True)
    with namespace(redis_url) as ns:
        workers = fleet(url, redis_url, ns, "--rpm", str(rpm), "--requests", str(per_caller))
    server = anyio.run(stats, url)
    span = server["last_admitted"] - server["first_admitted"]
    return {
        "rpm_utilization": (server["served_requests"] - 1) / span * 60.0 / rpm,
        "requests_per_caller": per_caller,
        "server_429s": server["total_429s"],
        "served_requests": server["served_requests"],
        "span_seconds": span,
        "per_worker_requests": [w["requests"] for w in workers],
        "client_rate_limited": sum(w["rate_limited"] for w in workers),
        "configured_rpm": rpm,
    }


def budget_fleet(url: str, redis_url: str, limit: int) -> dict[str, Any]:
    """4 processes share one token budget, every caller sending until refused: overshoot."""
    anyio.run(stats, url, True)
    with namespace(redis_url) as ns:
        workers = fleet(url, redis_url, ns, "--budget", str(limit))
    server = anyio.run(stats, url)
    refused = sum(w["seen"].get("budget", 0) for w in workers)
    return {
        "budget_overshoot_tokens": max(0, server["served_tokens"] - limit),
        "served_tokens": server["served_tokens"],
        "budget_tokens": limit,
        "budget_used_fraction": server["served_tokens"] / limit,
        "callers_refused_by_budget": refused,
        "per_worker_answers": [w["seen"].get("ok", 0) for w in workers],
        "other_outcomes": [
            {k: v for k, v in w["seen"].items() if k not in ("ok", "budget")} for w in workers
        ],
    }


def main() -> None:
    """Run the benchmark and print the JSON summary last."""
    parser = argparse.ArgumentParser(description="shared-coordination (Redis) benchmark")
    parser.add_argument("--quick", action="store_true", help="the < 60 s variant")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    quick = args.quick
    t_start = time.perf_counter()
    redis_sync.Redis.from_url(args.redis, socket_connect_timeout=2).ping()
    rpm = 6000.0
    details: dict[str, Any] = {}
    with echo_server() as url:
        details["sequential"] = anyio.run(sequential, url, args.redis, 600 if quick else 2000)
        details["concurrent"] = anyio.run(
            concurrent, url, args.redis, 500 if quick else 2000, args.concurrency, 3 if quick else 7
        )
        details["budget"] = budget_fleet(url, args.redis, 20_000 if quick else 200_000)
    with echo_server("--rpm", str(rpm), "--burst", "1.0") as url:
        details["rpm"] = rpm_fleet(url, args.redis, rpm, 1 if quick else 5)
    info = redis_sync.Redis.from_url(args.redis).info("server")
    result = {
        "added_ms_per_request": round(details["sequential"]["added_ms_per_request"], 4),
        "added_ms_per_request_concurrent": round(details["concurrent"]["added_ms_per_request_concurrent"], 4),
        "added_cpu_ms_per_request": round(details["concurrent"]["added_cpu_ms_per_request"], 4),
        "rpm_utilization_4_processes": round(details["rpm"]["rpm_utilization"], 4),
        "server_429s": details["rpm"]["server_429s"],
        "budget_overshoot_tokens_4_processes": details["budget"]["budget_overshoot_tokens"],
        "budget_used_fraction_4_processes": round(details["budget"]["budget_used_fraction"], 4),
        "mode": "quick" if quick else "full",
        "concurrency": args.concurrency,
        "configured_rpm": rpm,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "redis_server": info.get("redis_version"),
        "versions": {p: version(p) for p in ("redis", "aiohttp", "anyio")},
        "benchmark_seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(details, indent=1, default=str))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
