"""Big, endless and deeply nested answers keep the event loop alive and memory bounded.

- each provider refuses answers past its own cap unread (`BadResponse`), by Content-Length or as they
  stream in: OpenAI 16 MiB (logprobs make long answers big), Anthropic 4 MiB;
- an answer under the cap stalls the loop at most for one parse of it, timed in the same run (CPython's
  JSON parser holds the GIL, so the cap is what bounds it), and the scheduler's timeout fires while the
  body is read;
- bytes buffered by answers in flight stay under `max_buffered_bytes` across concurrent requests;
- deeply nested JSON is a `BadResponse`, never a RecursionError.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from _loopback import Hostile, hostile, openai_answer
from aiohttp import web
from evomerge_anthropic import AnthropicProvider
from evomerge_openai import OpenAIProvider

from evomerge_sdk import BadResponse, ChatRequest
from evomerge_sdk import RequestTimeout as SDKTimeout
from evomerge_sdk.http.wire import loads
from evomerge_sdk.scheduler import RetryPolicy, Scheduler

pytestmark = pytest.mark.anyio

MODEL = "gpt-4o-mini"
MiB = 1 << 20


def question(i: int = 0, model: str = MODEL) -> ChatRequest:
    return ChatRequest(model=model, messages=f"question {i}?", max_tokens=8)


def padded(body: dict[str, Any], size: int) -> bytes:
    """A valid chat answer of about `size` bytes (a long run of small numbers: costly to parse)."""
    answer = openai_answer(body, {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6})
    head = web.json_response(answer).text
    filler = ",".join(["1"] * (size // 2))
    return (head[:-1] + ',"padding":[' + filler + "]}").encode()


def parse_seconds(body: bytes) -> float:
    """Seconds one parse of `body` takes on this machine now, by the parser the client uses."""
    started = time.perf_counter()
    loads(body)
    return time.perf_counter() - started


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_answer_past_the_provider_cap_is_refused_unread(chunked: bool) -> None:
    # Built once, before the clock starts: building 60 MiB takes seconds on a loaded machine.
    data = padded({"model": MODEL}, 60 * MiB)

    async def handler(request: web.Request, server: Hostile) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=data, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(data), MiB):
            await response.write(data[start : start + MiB])
        return response

    async with hostile(handler) as server, OpenAIProvider(base_url=server.url, api_key="sk-x") as provider:
        assert provider.max_answer_bytes == 16 * MiB
        started = time.monotonic()
        with pytest.raises(BadResponse, match="longer than"):
            await provider.complete(question())
        assert time.monotonic() - started < 5


async def test_anthropic_has_its_own_smaller_cap() -> None:
    async with AnthropicProvider(base_url="http://127.0.0.1:9", api_key="sk-ant-x") as provider:
        assert provider.max_answer_bytes == 4 * MiB


async def test_a_big_answer_under_the_cap_stalls_the_loop_boundedly_and_the_timeout_fires() -> None:
    body = padded({"model": MODEL}, 15 * MiB)  # built once, before the loop is watched
    pieces = 16

    async def handler(request: web.Request, server: Hostile) -> web.StreamResponse:
        # Sent with its Content-Length in paced pieces: the transfer lasts at least 0.15 s, three times
        # the timeout, however fast this machine reads loopback. Sent at once, a 15 MiB answer is read
        # in 20-50 ms, so a 0.05 s deadline could fall in the parse, which no timeout can interrupt.
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        step = -(-len(body) // pieces)
        for start in range(0, len(body), step):
            if start:
                await anyio.sleep(0.01)
            await response.write(body[start : start + step])
        return response

    gaps: list[float] = []
    # The bound is one parse of this body, timed here in the same run: on a busy 2-core machine a parse
    # of 15 MiB takes from 0.3 s to several seconds, so no absolute bound is both tight and safe.
    one_parse = parse_seconds(body)

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with (
        hostile(handler) as server,
        OpenAIProvider(base_url=server.url, api_key="sk-x") as provider,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(ticker)
        completion = await provider.complete(question())
        assert completion.text == "Paris"
        async with Scheduler(timeout=0.05, retry=RetryPolicy(max_attempts=1), cache=False) as scheduler:
            started = time.monotonic()
            with pytest.raises(SDKTimeout):  # fires during the paced read, before any parse
                await scheduler.complete(provider, question(1))
            assert time.monotonic() - started < 3.0  # not the 8-13 s of a 60 MiB parse
        tg.cancel_scope.cancel()
    one_parse = max(one_parse, parse_seconds(body))
    assert max(gaps) < 2 * one_parse + 0.5, (max(gaps), one_parse)  # one capped parse at most


async def test_buffered_bytes_are_bounded_across_concurrent_answers() -> None:
    async def handler(request: web.Request, server: Hostile) -> web.StreamResponse:
        return web.Response(body=padded(server.bodies[-1], 3 * MiB), content_type="application/json")

    async with hostile(handler) as server:
        provider = OpenAIProvider(
            base_url=server.url, api_key="sk-x", max_answer_bytes=4 * MiB, max_buffered_bytes=8 * MiB
        )
        async with provider, anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(provider.complete, question(i))
        assert 6 * MiB <= provider.buffered_bytes_peak <= 8 * MiB


@pytest.mark.parametrize("depth", [5_000, 200_000])
async def test_deeply_nested_json_is_a_bad_response(depth: int) -> None:
    async def handler(request: web.Request, server: Hostile) -> web.StreamResponse:
        nested = b'{"choices":' + b"[" * depth + b"]" * depth + b"}"
        return web.Response(body=nested, content_type="application/json")

    async with hostile(handler) as server, OpenAIProvider(base_url=server.url, api_key="sk-x") as provider:
        with pytest.raises(BadResponse, match="nested"):
            await provider.complete(question())


async def test_a_deeply_nested_error_body_still_maps_to_the_status() -> None:
    async def handler(request: web.Request, server: Hostile) -> web.StreamResponse:
        return web.Response(body=b"[" * 100_000 + b"]" * 100_000, status=503, content_type="application/json")

    async with hostile(handler) as server, OpenAIProvider(base_url=server.url, api_key="sk-x") as provider:
        with pytest.raises(Exception) as caught:
            await provider.complete(question())
    assert getattr(caught.value, "status", None) == 503
