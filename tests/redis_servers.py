"""Real Redis for the shared-coordination tests: the machine's server, a private one to kill, and workers.

- `redis_url` (fixture): the Redis the project's machines and CI run on 127.0.0.1:6379. Missing, the
  tests skip on a laptop and FAIL in CI (`CI=true`): `.ci/run` starts it, so absent means broken.
- `namespace` (fixture): a fresh namespace per test, whose keys are deleted afterwards.
- `PrivateRedis`: a `redis-server` of the test's own on a free port (no persistence, a temp folder), for
  the tests that kill or restart Redis: the shared server on 6379 is never touched.
- `Fleet`: worker processes (`tests/scheduler/_redis_worker.py`), started together, read back as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

SHARED_URL = "redis://127.0.0.1:6379/0"
WORKER = Path(__file__).parent / "scheduler" / "_redis_worker.py"
START_COMMAND = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
    "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
)


def _missing(why: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why}; CI needs it (.ci/run starts it with: {START_COMMAND})")
    pytest.skip(f"{why} (start it with: {START_COMMAND})")


@pytest.fixture
def redis_url() -> str:
    """The machine's Redis, checked with a ping."""
    try:
        redis.Redis.from_url(SHARED_URL, socket_timeout=2, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        _missing(f"no Redis at {SHARED_URL}: {exc}")
    return SHARED_URL


def delete_namespace(url: str, namespace: str) -> None:
    """Delete every key of a namespace (the tests' own clean-up, independent of the SDK's)."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"evomerge:{{{namespace}}}:*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass
    finally:
        client.close()


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A namespace no other test (or helper) uses; deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    delete_namespace(redis_url, name)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of one test's own (no persistence), which the test may kill and start again."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            _missing("no redis-server binary")
        self.binary = str(binary)
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (on the same port as before) and wait until it answers."""
        self.proc = subprocess.Popen(
            [
                *(self.binary, "--bind", "127.0.0.1", "--port", str(self.port)),
                *("--save", "", "--appendonly", "no", "--dir", str(self.folder)),
                *("--daemonize", "no", "--loglevel", "warning"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        """SIGKILL it (a crash: nothing is saved)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A started `PrivateRedis`, killed at the end whatever happened."""
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Worker:
    """One worker process; its stdout read line by line."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        self._buffer = b""
        self.lines: list[str] = []

    async def _line(self) -> str | None:
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            try:
                chunk = await self.proc.stdout.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        text = line.decode()
        self.lines.append(text)
        return text

    async def ready(self) -> None:
        """Wait for the worker's `{"ready": true}` (its scheduler is open)."""
        while True:
            line = await self._line()
            if line is None:
                raise RuntimeError(f"worker exited before it was ready: {self.lines}")
            if line.startswith('{"ready"'):
                return

    async def result(self) -> dict[str, Any]:
        """Wait for the worker to finish; its last JSON line."""
        while await self._line() is not None:
            pass
        code = await self.proc.wait()
        assert code == 0, f"worker exited with {code}: {self.lines[-3:]}"
        doc: dict[str, Any] = json.loads(self.lines[-1])
        return doc


async def start_fleet(n: int, *args: str) -> list[Worker]:
    """Start `n` workers with `args` (each also gets `--worker i`), and wait until all are ready."""
    env = dict(os.environ)
    workers = []
    for i in range(n):
        proc = await anyio.open_process(
            [sys.executable, str(WORKER), *args, "--worker", str(i)], stderr=None, env=env
        )
        workers.append(Worker(proc))
    for w in workers:
        await w.ready()
    return workers


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll `condition` (a server's counter) every 10 ms until it holds; callers bound the wait."""
    while not condition():  # noqa: ASYNC110  (a counter of another object: nothing to wait on)
        await anyio.sleep(0.01)


async def go(workers: list[Worker]) -> None:
    """Let every ready worker start its callers."""
    for w in workers:
        assert w.proc.stdin is not None
        await w.proc.stdin.send(b"go\n")


async def stop_fleet(workers: list[Worker]) -> None:
    """Kill whatever still runs (a failed test must not leave workers behind)."""
    for w in workers:
        if w.proc.returncode is None:
            w.proc.kill()
            with anyio.CancelScope(shield=True):
                await w.proc.wait()
