"""The response cache: memory, SQLite persistence (0600, off-loop writes), and resuming a killed run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import sys
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge_sdk import ChatRequest, ConfigError, StorageError, Usage
from evomerge_sdk.scheduler import ResponseCache, Scheduler, cache_key, chat_cache_key
from evomerge_sdk.testing import EchoServer


def _modes(path: Path) -> dict[str, int]:
    """Permission bits of the database file and its WAL companions that exist."""
    found = {}
    for suffix in ("", "-wal", "-shm"):
        f = Path(f"{path}{suffix}")
        if f.exists():
            found[suffix] = stat.S_IMODE(f.stat().st_mode)
    return found


def _rows(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT value FROM responses")]


def test_keys_are_stable_and_separate_their_parts() -> None:
    assert cache_key("a", "b") == cache_key("a", "b")
    assert cache_key("ab", "c") != cache_key("a", "bc")
    assert len(cache_key("x")) == 64


def test_bad_cache_settings_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_memory_entries"):
        ResponseCache(max_memory_entries=0)
    with pytest.raises(ConfigError, match="directory"):
        ResponseCache(tmp_path)
    with pytest.raises(ConfigError, match="cache must be"):
        Scheduler(cache=3.5)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_memory_cache_with_lru_bound() -> None:
    cache = ResponseCache(max_memory_entries=2)
    await cache.open()
    cache.put("a", {"v": 1}, Usage(1, 1))
    cache.put("b", {"v": 2}, Usage(1, 1))
    assert cache.get("a") is not None  # touch a: b is now the oldest
    cache.put("c", {"v": 3}, Usage(1, 1))
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None
    await cache.aclose()


@pytest.mark.anyio
async def test_sqlite_cache_persists_user_only(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    cache = ResponseCache(path)
    await cache.open()
    for i in range(300):
        cache.put(f"k{i}", {"text": f"answer {i}", "n": [i, i + 1]}, Usage(i, 2 * i, 0))
    await cache.flush()
    assert _modes(path) and set(_modes(path).values()) == {0o600}
    await cache.aclose()

    again = ResponseCache(path)
    await again.open()
    assert again.get("k7") is None  # not in memory yet...
    assert again.on_disk("k7") and not again.on_disk("nope")  # ...but known without I/O
    hit = await again.load("k7")
    assert hit is not None and hit.value == {"text": "answer 7", "n": [7, 8]} and hit.usage == Usage(7, 14, 0)
    assert again.get("k7") is not None
    assert len(again) == 300
    await again.aclose()


@pytest.mark.anyio
async def test_values_that_are_not_json_are_counted_not_fatal(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    await cache.open()
    cache.put("bad", {"x": {1, 2}}, Usage())
    cache.put("good", {"x": 1}, Usage())
    with pytest.raises(StorageError, match=r"c\.sqlite.*1 result"):  # never silent: the next flush says so
        await cache.flush()
    await cache.flush()  # said once; the writer went on with the good row
    assert cache.write_errors == 1
    assert cache.on_disk("good")
    await cache.aclose()
    with sqlite3.connect(tmp_path / "c.sqlite") as conn:
        assert [r[0] for r in conn.execute("SELECT key FROM responses")] == ["good"]


@pytest.mark.anyio
async def test_a_file_that_is_not_sqlite_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"this is not a database, just some bytes " * 100)
    with pytest.raises(ConfigError, match="not a usable SQLite database"):
        await ResponseCache(path).open()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "schema", ["CREATE TABLE users (id INTEGER)", "CREATE TABLE responses (id INTEGER, body TEXT)"]
)
async def test_another_programs_database_is_refused_and_left_as_it_was(tmp_path: Path, schema: str) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute(schema)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="needs a file of its own"):
        await ResponseCache(path).open()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["app.db"]  # no -wal or -shm beside it


_RUN = """
import anyio, sys, json
from evomerge_sdk import ChatRequest
from evomerge_sdk.scheduler import Scheduler
from evomerge_sdk.testing import EchoProvider

async def main() -> None:
    provider = EchoProvider(sys.argv[1])
    async with Scheduler(max_concurrency=1, cache=sys.argv[2]) as s:
        for i in range(int(sys.argv[3])):
            request = ChatRequest(model="gpt-4o-mini", messages=f"question {i}", max_tokens=32)
            await s.complete(provider, request)
            print(i, flush=True)
            await anyio.sleep(0.02)
    await provider.aclose()

anyio.run(main)
"""


@pytest.mark.anyio
async def test_a_killed_run_resumes_from_its_cache_without_paying_twice(tmp_path: Path) -> None:
    n = 40
    path = tmp_path / "run.sqlite"
    async with EchoServer() as server:
        proc = await anyio.open_process([sys.executable, "-c", _RUN, server.url, str(path), str(n)])
        assert proc.stdout is not None
        seen = b""
        with anyio.fail_after(60):  # a hang guard
            async for chunk in proc.stdout:
                seen += chunk
                if seen.count(b"\n") >= 10:
                    break
        proc.send_signal(signal.SIGKILL)  # no clean shutdown, no final flush
        await proc.wait()
        await proc.aclose()
        first_run = server.stats.served_requests
        with sqlite3.connect(path) as conn:
            committed = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        assert 1 <= committed <= first_run < n

        provider = server.provider()
        async with Scheduler(cache=path) as s:
            answers = [
                await s.complete(
                    provider, ChatRequest(model="gpt-4o-mini", messages=f"question {i}", max_tokens=32)
                )
                for i in range(n)
            ]
            m = s.metrics()
        await provider.aclose()
    assert [a.text for a in answers] == [f"echo: question {i}" for i in range(n)]
    assert m.cache_hits == committed
    assert server.stats.served_requests - first_run == n - committed  # only the missing ones were paid


@pytest.mark.anyio
async def test_checkpoint_flush_makes_results_durable(tmp_path: Path) -> None:
    path = tmp_path / "cp.sqlite"
    async with EchoServer() as server:
        provider = server.provider()
        async with Scheduler(cache=path) as s:
            async with anyio.create_task_group() as tg:
                for i in range(25):
                    tg.start_soon(
                        s.complete, provider, ChatRequest(model="gpt-4", messages=f"q{i}", max_tokens=32)
                    )
            await s.flush()
            with sqlite3.connect(path) as conn:  # another reader sees everything after the flush
                assert conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 25
        await provider.aclose()
    rows = _rows(path)
    assert len(rows) == 25 and all(json.loads(r)["text"].startswith("echo: q") for r in rows)


def test_the_echo_server_is_loopback_only() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        EchoServer(host="0.0.0.0")


_requests = st.builds(
    ChatRequest,
    model=st.sampled_from(["m", "n"]),
    messages=st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system"]), "content": st.sampled_from(["", "a", "b", "a:b"])}
        ),
        min_size=1,
        max_size=3,
    ),
    max_tokens=st.sampled_from([1, 16]),
    temperature=st.sampled_from([None, 0.0, 0.5]),
    top_p=st.sampled_from([None, 1.0]),
    logprobs=st.booleans(),
    top_logprobs=st.sampled_from([None, 0, 3]),
    extra=st.dictionaries(st.sampled_from(["seed", "stop"]), st.sampled_from([1, "x", None]), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(_requests, _requests)
def test_chat_keys_are_equal_exactly_for_equal_requests(a: ChatRequest, b: ChatRequest) -> None:
    assert (chat_cache_key("p", a) == chat_cache_key("p", b)) == (a == b)


def test_canonical_request_keys_differ_by_provider() -> None:
    req = ChatRequest(model="m", messages="x")
    assert chat_cache_key("a", req) != chat_cache_key("b", req)
