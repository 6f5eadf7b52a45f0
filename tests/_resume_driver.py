"""A small Evo-Merging search through a merge service, resumable: the subject of the reliability tests.

    python tests/_resume_driver.py --url http://127.0.0.1:PORT --checkpoint ck.json --cache c.sqlite \
        --out result.json [--api-key-env NAME] [--log log.jsonl]

The crash test SIGKILLs this script at random points and starts it again with the same files; the
fault test and the security test import `run_search` directly. Everything a run leaves behind (the
checkpoint, the SQLite cache, the result file, the DEBUG log) is what the security test greps for the key.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import attrs
import structlog

from evomerge_sdk._io import write_json_atomic
from evomerge_sdk.engine import EvoMerge, SearchConfig, SearchResult, StageConfig
from evomerge_sdk.local import preset_id
from evomerge_sdk.objectives import ServiceObjective
from evomerge_sdk.scheduler import Budget, MetricsSnapshot, RetryPolicy, Scheduler, Spend
from evomerge_sdk.service import MergeServiceClient

PRESET = preset_id("ood:ner/news", 5)
POPSIZE = 6
SEARCH = SearchConfig(
    name="reliability",
    denoise=StageConfig(
        start=1.0, sigma=0.2, lower=0.0, upper=1.0, max_evaluations=5 * POPSIZE, popsize=POPSIZE
    ),
    scale=StageConfig(
        start="1/N", sigma=0.1, lower=-1.5, upper=1.5, max_evaluations=10 * POPSIZE, popsize=POPSIZE
    ),
    early_stopping=None,
    seed=11,
)
"""Two stages, 15 generations of 6 candidates: 90 full-batch evaluations of a 5-adapter pool (spelled out,
not derived from a preset, so the counts the tests check do not move when the presets are tuned)."""

FAST_RETRY = RetryPolicy(max_attempts=8, base_delay=0.001, max_delay=0.02, max_retry_after=1.0, seed=5)


@attrs.frozen
class RunOutcome:
    """A search's result and what its scheduler saw."""

    result: SearchResult
    metrics: MetricsSnapshot
    spent: Spend


async def run_search(
    url: str,
    *,
    checkpoint: Path | None = None,
    cache: Path | bool = True,
    api_key: str | None = None,
    retry: RetryPolicy = FAST_RETRY,
    request_timeout: float = 60.0,
    budget: Budget | None = None,
    max_concurrency: int = POPSIZE,
) -> RunOutcome:
    """Run (or resume) `SEARCH` against the merge service at `url`."""
    scheduler = Scheduler(max_concurrency=max_concurrency, retry=retry, cache=cache, budget=budget)
    async with (
        scheduler,
        MergeServiceClient(
            url, api_key=api_key, scheduler=scheduler, timeout=request_timeout, tokens_per_example=12
        ) as client,  # the embedded world's examples are 12 tokens: the bound each evaluation reserves
    ):
        session = await client.create_session(PRESET)
        objective = ServiceObjective(client, session)
        result = await EvoMerge(objective, session.adapter_count, SEARCH, checkpoint=checkpoint).run()
        await scheduler.flush()
        return RunOutcome(result, scheduler.metrics(), scheduler.spent())


def outcome_document(outcome: RunOutcome) -> dict[str, Any]:
    """What the driver writes: the result, and the spend its scheduler counted."""
    return {
        "result": outcome.result.to_dict(),
        "requests": outcome.metrics.requests,
        "retries": outcome.metrics.retries,
        "cache_hits": outcome.metrics.cache_hits,
        "spent_tokens": outcome.spent.tokens,
    }


def _log_to(path: Path) -> None:
    """Every structlog event, DEBUG and up, as JSON lines in `path` (the security test reads it)."""
    handle = path.open("a", encoding="utf-8")
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer(default=repr)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(handle),
        cache_logger_on_first_use=False,
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the search, write the result file atomically."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--api-key-env", default=None, help="environment variable holding the API key")
    parser.add_argument("--log", type=Path, default=None, help="DEBUG log file (JSON lines)")
    args = parser.parse_args(argv)
    if args.log is not None:
        _log_to(args.log)
    else:  # quiet: stdout carries the one result line
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        )
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None

    async def go() -> RunOutcome:
        return await run_search(args.url, checkpoint=args.checkpoint, cache=args.cache, api_key=api_key)

    outcome = anyio.run(go)
    write_json_atomic(args.out, outcome_document(outcome))
    print(json.dumps({"done": True, "requests": outcome.metrics.requests}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
