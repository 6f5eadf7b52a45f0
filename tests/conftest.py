"""Shared pytest set-up; keep it minimal (several test modules append here)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import structlog
from redis_servers import namespace, private_redis, redis_url  # noqa: F401  (fixtures: real Redis)

from evomerge_sdk.local.repository import Repository, RepositoryConfig, build_repository
from evomerge_sdk.local.server import LocalService


@pytest.fixture
def anyio_backend() -> str:
    """anyio's pytest plugin runs `@pytest.mark.anyio` tests on asyncio only."""
    return "asyncio"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures structlog (printing to pytest's captured stderr): put the old set-up back,
    including "never configured", which decides whether the SDK's routine events are emitted."""
    configured, saved = structlog.is_configured(), structlog.get_config()
    yield
    if configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


@pytest.fixture(scope="session")
def repo() -> Repository:
    """The small embedded repository, built in memory once per test run (no test changes it; nothing is
    written to the user's repository cache)."""
    return build_repository(RepositoryConfig.small(), use_cache=False)


@pytest.fixture
async def service(repo: Repository) -> AsyncIterator[LocalService]:
    """The embedded service over `repo` with pools of 4 (test modules that need other pools override it)."""
    async with LocalService(repo, pool_sizes=(4,)) as s:
        yield s
