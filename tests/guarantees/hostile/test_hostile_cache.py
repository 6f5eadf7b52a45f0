"""The SQLite cache never fails silently.

- an error in its writer thread (a value SQLite cannot store, a file that went read-only) is counted in
  `write_errors`, logged, and raised by the next `flush()` as a `StorageError` naming the file; the
  writer keeps going, so later results are still stored;
- a damaged row (not JSON, the wrong shape for a chat answer, impossible token counts) is skipped and
  counted in `damaged_rows` (logged with the file's name): the request is asked again, as on a miss.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from _loopback import Hostile, honest_usage, hostile, openai_answer
from aiohttp import web
from evomerge_openai import OpenAIProvider
from structlog.testing import capture_logs

from evomerge_sdk import ChatRequest, StorageError, Usage
from evomerge_sdk.scheduler import ResponseCache, Scheduler, chat_cache_key

pytestmark = pytest.mark.anyio

MODEL = "gpt-4o-mini"


def question(i: int) -> ChatRequest:
    return ChatRequest(model=MODEL, messages=f"question {i}?", max_tokens=8)


async def answer(request: web.Request, server: Hostile) -> web.StreamResponse:
    body = server.bodies[-1]
    text = f"answer {server.requests}"
    return web.json_response(openai_answer(body, honest_usage(body, server), text=text))


async def test_a_writer_error_is_counted_logged_and_raised_at_the_next_flush(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    cache = ResponseCache(path)
    await cache.open()
    try:
        with capture_logs() as logs:
            cache.put("k" * 64, {"v": 1}, Usage(2**63, 0, 0))  # SQLite integers stop at 2^63 - 1
            with pytest.raises(StorageError, match=r"cache\.sqlite") as caught:
                await cache.flush()
        assert cache.write_errors == 1
        assert "1 result" in str(caught.value)
        assert any(e["event"] == "cache_write_failed" for e in logs)
        cache.put("a" * 64, {"v": 2}, Usage(1, 2, 0))  # the writer survived: later rows are stored
        await cache.flush()  # the error was reported once; nothing new failed
    finally:
        await cache.aclose()
    rows = sqlite3.connect(path).execute("SELECT key FROM responses").fetchall()
    assert rows == [("a" * 64,)]


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        ("{not json", (1, 1, 0)),
        (json.dumps([1, 2, 3]), (1, 1, 0)),
        (json.dumps({"text": 3}), (1, 1, 0)),
        (json.dumps({"text": "x", "model": MODEL, "finish_reason": None, "logprobs": None}), (-5, 1, 0)),
        (json.dumps({"text": "x", "model": MODEL, "finish_reason": None, "logprobs": None}), ("a", 1, 0)),
    ],
    ids=["not-json", "list", "wrong-field-type", "negative-tokens", "text-tokens"],
)
async def test_damaged_rows_are_skipped_counted_and_asked_again(
    value: str, tokens: tuple[Any, ...], tmp_path: Path
) -> None:
    path = tmp_path / "cache.sqlite"
    async with hostile(answer) as server, OpenAIProvider(base_url=server.url, api_key="sk-cache") as provider:
        async with Scheduler(cache=path) as scheduler:  # creates the file and its table
            await scheduler.complete(provider, question(0))
        key = chat_cache_key(provider.name, question(1))
        with sqlite3.connect(path) as conn:
            conn.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?)", (key, value, *tokens))
        with capture_logs() as logs:
            async with Scheduler(cache=path) as scheduler:
                completion = await scheduler.complete(provider, question(1))
                assert scheduler.cache is not None and scheduler.cache.damaged_rows == 1
                again = await scheduler.complete(provider, question(1))  # the fresh answer is kept
    assert completion.text == again.text == "answer 2"
    assert server.requests == 2
    damaged = [e for e in logs if e["event"] == "cache_row_damaged"]
    assert len(damaged) == 1 and "cache.sqlite" in damaged[0]["file"]
