"""With a fixed seed, a search through a faulty embedded service ends exactly like the same search through
a healthy one: 500/503s, 429s with Retry-After, timeouts, dropped connections and malformed JSON bodies
change how many requests are sent, never which losses the search sees."""

from __future__ import annotations

import pytest
from _resume_driver import FAST_RETRY, run_search

from evomerge_sdk.local.faults import FaultConfig
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.local.server import LocalService

# The issue's mix, per request: 10% 500/503, 5% 429 + Retry-After, 2% timeouts, 1% drops, 1% malformed.
ISSUE_FAULTS = dict(
    error_rate=0.10,
    rate_limit_rate=0.05,
    retry_after=0.02,
    hang_rate=0.02,
    hang_seconds=30.0,
    drop_rate=0.01,
    malformed_rate=0.01,
)
REQUEST_TIMEOUT = 1.0  # a hung request times out after this long and is retried


@pytest.mark.anyio
@pytest.mark.parametrize(
    "faults",
    [
        FaultConfig(seed=1, **ISSUE_FAULTS),  # type: ignore[arg-type]
        # Ten times harsher, so every kind of fault surely occurs within this small search.
        FaultConfig(
            seed=2,
            error_rate=0.25,
            rate_limit_rate=0.15,
            retry_after=0.01,
            hang_rate=0.05,
            drop_rate=0.1,
            malformed_rate=0.1,
            max_faults_per_request=3,
        ),
    ],
    ids=["issue-mix", "harsh"],
)
async def test_search_with_faults_equals_search_without(repo: Repository, faults: FaultConfig) -> None:
    async with LocalService(repo, pool_sizes=(5,)) as healthy:
        clean = await run_search(healthy.url, cache=False, request_timeout=REQUEST_TIMEOUT)
    async with LocalService(repo, pool_sizes=(5,), faults=faults) as faulty:
        noisy = await run_search(faulty.url, cache=False, request_timeout=REQUEST_TIMEOUT, retry=FAST_RETRY)
        injected = dict(faulty.stats.injected)
    assert noisy.result.to_dict() == clean.result.to_dict()  # vectors, loss, history: all identical
    assert noisy.metrics.failed == 0 and clean.metrics.retries == 0
    # One retry per injected fault (more only if the machine is so slow that a healthy request timed out).
    assert noisy.metrics.retries >= sum(injected.values()) > 0
    assert noisy.metrics.requests == clean.metrics.requests + noisy.metrics.retries
    if faults.seed == 2:
        assert set(injected) == {"server_error", "rate_limit", "hang", "drop", "malformed"}
