"""Scheduler benchmark against the loopback echo server (a separate process, so client and server each
have a core).

Measures, all within one run so machine noise cancels in the ratios:

- overhead_ratio: wall time of N chat requests through `Scheduler.complete` over raw aiohttp (same
  server, same concurrency, same connection limit), alternating the two, median over repeats;
- adapter_overhead_ratio: the same with the real stack, `Scheduler` (default settings: cache, timeout)
  plus the `evomerge-openai` adapter, against raw aiohttp sending the very same requests (the adapter's
  body bytes and headers, its API key included) and parsing the answers as JSON;
- per_request_overhead_ms: median latency through the scheduler minus median raw latency, one request
  at a time (interleaved pairs);
- rpm_utilization / server_429s: achieved RPM over configured RPM against a server that enforces that
  RPM with 429s (GCRA, `--burst` seconds of tolerance); the same load without a client limiter is run
  too, to show the server really refuses;
- budget_overshoot_tokens: tokens the server served beyond a token budget, with 200 concurrent callers
  each sending until `BudgetExceeded`;
- import_seconds: median wall time of a fresh `python -c "import evomerge_sdk"`.

structlog is configured to WARNING (as a production app would), so per-request debug events cost a
level check only. Usage:

    python benchmarks/scheduler.py --quick     # < 60 s
    python benchmarks/scheduler.py             # full mode, with fault and TPM variants

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from importlib.metadata import version
from typing import Any

import aiohttp
import anyio
import structlog

from evomerge_sdk import BudgetExceeded, ChatRequest, Provider
from evomerge_sdk.scheduler import Budget, RetryPolicy, Scheduler, TokenCounter
from evomerge_sdk.testing import EchoProvider

MODEL = "gpt-4o-mini"
MAX_TOKENS = 16


@contextmanager
def echo_server(*args: str) -> Iterator[str]:
    """Start `python -m evomerge_sdk.testing.echo_server` with `args`; yield its URL; stop it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge_sdk.testing.echo_server", *args],
        stdout=subprocess.PIPE,
        text=True,
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


def request(tag: str, i: int) -> ChatRequest:
    """A distinct small chat request (distinct: no cache hits between runs)."""
    return ChatRequest(
        model=MODEL, messages=f"{tag} question number {i}: what is {i} plus {i}?", max_tokens=MAX_TOKENS
    )


async def stats(url: str, reset: bool = False) -> dict[str, Any]:
    """The server's accounting (and optionally reset it)."""
    async with aiohttp.ClientSession() as session:
        if reset:
            async with session.post(f"{url}/stats/reset") as r:
                await r.read()
            return {}
        async with session.get(f"{url}/stats") as r:
            data: dict[str, Any] = await r.json()
            return data


async def raw_run(url: str, tag: str, n: int, concurrency: int, accept_429: bool = False) -> float:
    """Wall seconds for n requests with plain aiohttp at `concurrency`."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    provider = EchoProvider(url)  # only for its body builder: the same JSON goes over the wire
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        sem = anyio.Semaphore(concurrency)
        endpoint = f"{url}/v1/chat/completions"

        async def one(i: int) -> None:
            async with sem, session.post(endpoint, json=provider.body(request(tag, i))) as r:
                data = await r.json()
                assert (accept_429 and r.status == 429) or data["choices"][0]["message"]["content"]

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        return time.perf_counter() - start


BENCH_KEY = "sk-benchmark"


async def raw_openai_run(url: str, tag: str, n: int, concurrency: int) -> float:
    """Wall seconds for n requests with plain aiohttp, sending exactly what the OpenAI adapter sends."""
    from evomerge_openai import OpenAIProvider

    body_for = OpenAIProvider(base_url=f"{url}/v1", api_key=BENCH_KEY).body_for
    headers = {"Authorization": f"Bearer {BENCH_KEY}", "Accept": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        sem = anyio.Semaphore(concurrency)
        endpoint = f"{url}/v1/chat/completions"

        async def one(i: int) -> None:
            async with sem, session.post(endpoint, json=body_for(request(tag, i))) as r:
                data = await r.json()
                assert data["choices"][0]["message"]["content"]

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        return time.perf_counter() - start


async def adapter_overhead(url: str, n: int, concurrency: int, repeats: int) -> dict[str, Any]:
    """Pairs of raw aiohttp and Scheduler + evomerge-openai runs (order shuffled, seeded), same requests;
    the median of the per-pair wall-time ratios, as in `overhead`."""
    await raw_openai_run(url, "warm-raw-openai", 200, concurrency)
    await scheduler_run(url, "warm-openai", 200, concurrency, openai_adapter)
    rng = random.Random(1)
    runs: dict[str, list[tuple[float, float]]] = {"raw": [], "adapter": []}
    for r in range(repeats):
        order = ["raw", "adapter"]
        rng.shuffle(order)
        for which in order:
            cpu = time.process_time()
            if which == "raw":
                wall = await raw_openai_run(url, f"rawo{r}", n, concurrency)
            else:
                wall = (await scheduler_run(url, f"adapter{r}", n, concurrency, openai_adapter))[0]
            runs[which].append((wall, time.process_time() - cpu))
    pairs = list(zip(runs["raw"], runs["adapter"], strict=True))
    return {
        "adapter_overhead_ratio": statistics.median(a[0] / r[0] for r, a in pairs),
        "client_cpu_ratio": statistics.median(a[1] / r[1] for r, a in pairs),
        "client_cpu_us_added_per_request": statistics.median((a[1] - r[1]) / n * 1e6 for r, a in pairs),
        "raw_seconds": [round(r[0], 4) for r in runs["raw"]],
        "adapter_seconds": [round(a[0], 4) for a in runs["adapter"]],
    }


def openai_adapter(url: str, concurrency: int) -> Provider:
    """The real `evomerge-openai` adapter pointed at the echo server (the full SDK stack)."""
    from evomerge_openai import OpenAIProvider

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
    provider = OpenAIProvider(base_url=f"{url}/v1", api_key=BENCH_KEY, session=session)
    close = provider.aclose

    async def aclose() -> None:
        await close()
        await session.close()

    provider.aclose = aclose  # type: ignore[method-assign]
    return provider


def echo_provider(url: str, concurrency: int) -> Provider:
    """The lean test provider: plain aiohttp, as thin as the raw baseline."""
    return EchoProvider(url, max_connections=concurrency)


async def scheduler_run(
    url: str, tag: str, n: int, concurrency: int, provider_factory: Any = echo_provider, **kw: Any
) -> tuple[float, Scheduler]:
    """Wall seconds for n requests through `Scheduler.complete` at `concurrency`."""
    provider = provider_factory(url, concurrency)
    try:
        async with Scheduler(max_concurrency=concurrency, **kw) as s:
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(s.complete, provider, request(tag, i))
            return time.perf_counter() - start, s
    finally:
        await provider.aclose()


async def overhead(
    url: str, n: int, concurrency: int, repeats: int, provider_factory: Any = echo_provider, **kw: Any
) -> dict[str, Any]:
    """Pairs of raw and scheduler runs (order shuffled, seeded); the median of the per-pair ratios.

    On a shared machine, load drifts between runs; the two runs of a pair are adjacent, so their ratio
    cancels most of it. Client CPU time (this process only; the server is another process) is the
    noise-robust view of what the scheduler adds.
    """
    await raw_run(url, "warm-raw", 200, concurrency)
    await scheduler_run(url, "warm-s", 200, concurrency, provider_factory, **kw)
    rng = random.Random(0)
    runs: dict[str, list[tuple[float, float]]] = {"raw": [], "scheduler": []}
    for r in range(repeats):
        order = ["raw", "scheduler"]
        rng.shuffle(order)
        for which in order:
            cpu = time.process_time()
            if which == "raw":
                wall = await raw_run(url, f"raw{r}", n, concurrency)
            else:
                wall = (await scheduler_run(url, f"s{r}{kw}", n, concurrency, provider_factory, **kw))[0]
            runs[which].append((wall, time.process_time() - cpu))
    raw, sched = runs["raw"], runs["scheduler"]
    pairs = list(zip(raw, sched, strict=True))
    return {
        "overhead_ratio": statistics.median(s[0] / r[0] for r, s in pairs),
        "overhead_ratio_of_medians": statistics.median(s[0] for s in sched)
        / statistics.median(r[0] for r in raw),
        "overhead_ratio_of_fastest": min(s[0] for s in sched) / min(r[0] for r in raw),
        "client_cpu_ratio": statistics.median(s[1] / r[1] for r, s in pairs),
        "client_cpu_us_added_per_request": statistics.median((s[1] - r[1]) / n * 1e6 for r, s in pairs),
        "raw_seconds": [round(r[0], 4) for r in raw],
        "scheduler_seconds": [round(s[0], 4) for s in sched],
        "raw_client_cpu_seconds": [round(r[1], 4) for r in raw],
        "scheduler_client_cpu_seconds": [round(s[1], 4) for s in sched],
        "raw_rps": n / statistics.median(r[0] for r in raw),
        "scheduler_rps": n / statistics.median(s[0] for s in sched),
    }


async def sequential(url: str, n: int) -> dict[str, Any]:
    """Interleaved one-at-a-time requests: median added latency per request."""
    provider = EchoProvider(url, max_connections=1)
    raw_lat, sched_lat = [], []
    endpoint = f"{url}/v1/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session, Scheduler() as s:
        for i in range(-20, n):  # the first 20 pairs warm both paths up
            body = provider.body(request("seqraw", i))
            t0 = time.perf_counter()
            async with session.post(endpoint, json=body) as r:
                data = await r.json()
            t1 = time.perf_counter()
            assert data["choices"][0]["message"]["content"]
            await s.complete(provider, request("seqs", i))
            t2 = time.perf_counter()
            if i >= 0:
                raw_lat.append(t1 - t0)
                sched_lat.append(t2 - t1)
    await provider.aclose()
    raw_med, sched_med = statistics.median(raw_lat), statistics.median(sched_lat)
    return {
        "per_request_overhead_ms": (sched_med - raw_med) * 1e3,
        "raw_latency_ms_p50": raw_med * 1e3,
        "scheduler_latency_ms_p50": sched_med * 1e3,
        "paired_difference_ms_p50": statistics.median(b - a for a, b in zip(raw_lat, sched_lat, strict=True))
        * 1e3,
    }


async def unlimited(url: str, n: int, concurrency: int) -> dict[str, Any]:
    """The baseline: n raw aiohttp requests at `concurrency`, no limiter, no retries; how many get 429."""
    await stats(url, reset=True)
    wall = await raw_run(url, "unlimited", n, concurrency, accept_429=True)
    server = await stats(url)
    return {"wall_seconds": wall, "server_429s": server["total_429s"], "requests": n}


async def rate_limited(url: str, n: int, rpm: float | None, tpm: float | None) -> dict[str, Any]:
    """n requests at concurrency 64 through the scheduler, against a server enforcing the same limits."""
    await stats(url, reset=True)
    provider = EchoProvider(url, max_connections=64)
    retry = RetryPolicy(max_attempts=50, base_delay=0.01)
    async with Scheduler(max_concurrency=64, retry=retry, rpm=rpm, tpm=tpm) as s:
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(s.complete, provider, request(f"rate{rpm}{tpm}", i))
        wall = time.perf_counter() - start
        m = s.metrics()
    await provider.aclose()
    server = await stats(url)
    out: dict[str, Any] = {
        "wall_seconds": wall,
        "server_429s": server["total_429s"],
        "client_retries": m.retries,
    }
    span = server["last_admitted"] - server["first_admitted"]
    if rpm is not None:
        out["rpm_utilization"] = n / wall * 60.0 / rpm
        out["rpm_utilization_server_side"] = (server["served_requests"] - 1) / span * 60.0 / rpm
    if tpm is not None:
        reserved = (m.tokens_in + n * MAX_TOKENS) / n  # tokens per request as the limits count them
        out["tpm_utilization"] = n * reserved / wall * 60.0 / tpm
    return out


async def budget(url: str, callers: int, budget_tokens: int, faulty: bool) -> dict[str, Any]:
    """`callers` concurrent callers, each sending until BudgetExceeded; tokens served beyond the budget."""
    await stats(url, reset=True)
    provider = EchoProvider(url, max_connections=100)
    retry = RetryPolicy(max_attempts=6, base_delay=0.005, max_delay=0.05)
    async with Scheduler(
        max_concurrency=100, budget=Budget(tokens=budget_tokens), retry=retry, timeout=1.0
    ) as s:
        counter = {"ok": 0, "failed": 0}

        async def caller(c: int) -> None:
            i = 0
            while True:
                i += 1
                try:
                    await s.complete(provider, request(f"b{faulty}{c}", i))
                    counter["ok"] += 1
                except BudgetExceeded:
                    return
                except Exception:
                    counter["failed"] += 1  # a fault that outlived the retries: the caller moves on

        with anyio.fail_after(300):
            async with anyio.create_task_group() as tg:
                for c in range(callers):
                    tg.start_soon(caller, c)
        spent = s.spent()
    await provider.aclose()
    server = await stats(url)
    return {
        "budget_overshoot_tokens": max(0, server["served_tokens"] - budget_tokens),
        "budget_tokens": budget_tokens,
        "served_tokens": server["served_tokens"],
        "charged_tokens": spent.tokens,
        "budget_used": server["served_tokens"] / budget_tokens,
        "completed": counter["ok"],
        "failed_calls": counter["failed"],
    }


def import_seconds(repeats: int) -> dict[str, float]:
    """Median wall time of a fresh interpreter importing the SDK (and of an empty one, for reference)."""

    def timed(code: str) -> float:
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    return {"import_seconds": timed("import evomerge_sdk"), "python_startup_seconds": timed("pass")}


def main() -> None:
    """Run the benchmark and print the JSON summary last."""
    parser = argparse.ArgumentParser(description="scheduler benchmark")
    parser.add_argument("--quick", action="store_true", help="the < 60 s variant")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--burst", type=float, default=1.0, help="server GCRA tolerance (seconds)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    quick = args.quick
    repeats = 5 if quick else 9
    n_seq = 300 if quick else 1500
    rpm = 6000.0
    n_rate = 600 if quick else 6000  # 6 s / 60 s at 100 requests per second
    t_start = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.perf_counter() - t_start, 1)

    exact = TokenCounter().is_exact(MODEL)
    result: dict[str, Any] = {}
    details: dict[str, Any] = {}

    with echo_server() as url:
        # quick: 3 pairs for the lean-provider ratio, 5 for the real stack's (the figure issue 16 bounds)
        o = anyio.run(overhead, url, 2000, args.concurrency, 3 if quick else repeats)
        details["overhead"] = o
        result["overhead_ratio"] = round(o["overhead_ratio"], 4)
        result["client_cpu_ratio"] = round(o["client_cpu_ratio"], 4)
        if not quick:  # with a budget every prompt is counted with tiktoken and reserved
            loaded = partial(overhead, budget=Budget(tokens=10**12))
            ob = anyio.run(loaded, url, 2000, args.concurrency, 5)
            details["overhead_with_budget"] = ob
            result["overhead_ratio_with_budget"] = round(ob["overhead_ratio"], 4)
        a = anyio.run(adapter_overhead, url, 2000, args.concurrency, repeats)
        details["adapter_overhead"] = a
        result["adapter_overhead_ratio"] = round(a["adapter_overhead_ratio"], 4)
        phase("overhead")
        sq = anyio.run(sequential, url, n_seq)
        details["sequential"] = sq
        result["per_request_overhead_ms"] = round(sq["per_request_overhead_ms"], 4)
        phase("sequential")
        b = anyio.run(budget, url, 200, 60_000 if quick else 300_000, False)
        details["budget"] = b
        result["budget_overshoot_tokens"] = b["budget_overshoot_tokens"]
        phase("budget")

    with echo_server("--rpm", str(rpm), "--burst", str(args.burst)) as url:
        r = anyio.run(rate_limited, url, n_rate, rpm, None)
        details["rpm"] = r
        result["rpm_utilization"] = round(r["rpm_utilization"], 4)
        result["server_429s"] = r["server_429s"]
        naive = anyio.run(unlimited, url, 800, 64)
        details["rpm_raw_aiohttp_no_limiter"] = naive
        result["server_429s_raw_aiohttp_no_limiter"] = naive["server_429s"]
        phase("rpm")

    if not quick:
        strict = max(0.05, args.burst / 10)
        with echo_server("--rpm", str(rpm), "--burst", str(strict)) as url:
            details["rpm_strict_server"] = anyio.run(rate_limited, url, 3000, rpm, None)
            details["rpm_strict_server"]["burst_seconds"] = strict
        tpm = 240_000.0
        with echo_server("--tpm", str(tpm), "--burst", str(args.burst)) as url:
            details["tpm"] = anyio.run(rate_limited, url, 3000, None, tpm)
        faults = json.dumps(
            {
                "seed": 3,
                "drop_rate": 0.1,
                "malformed_rate": 0.1,
                "error_rate": 0.1,
                "rate_limit_rate": 0.05,
                "retry_after": 0.01,
                "hang_rate": 0.01,
                "hang_seconds": 5.0,
            }
        )
        with echo_server("--faults", faults) as url:
            details["budget_with_faults"] = anyio.run(budget, url, 200, 100_000, True)
            result["budget_overshoot_tokens_with_faults"] = details["budget_with_faults"][
                "budget_overshoot_tokens"
            ]
        with echo_server() as url:
            details["budget_500_callers"] = anyio.run(budget, url, 500, 300_000, False)

    imp = import_seconds(3 if quick else 7)
    phase("import")
    details["phases_elapsed_seconds"] = phases
    details["import"] = imp
    result["import_seconds"] = round(imp["import_seconds"], 4)
    result["python_startup_seconds"] = round(imp["python_startup_seconds"], 4)
    result.update(
        {
            "mode": "quick" if quick else "full",
            "concurrency": args.concurrency,
            "requests": 2000,
            "configured_rpm": rpm,
            "server_burst_seconds": args.burst,
            "exact_token_counts": exact,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "versions": {p: version(p) for p in ("aiohttp", "anyio", "tiktoken", "structlog")},
            "benchmark_seconds": round(time.perf_counter() - t_start, 1),
        }
    )
    print(json.dumps(details, indent=1, default=str))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
