"""`evomerge serve` (output mode, the real CLI in a subprocess) when its upstream fails or its budget runs
out: an OpenAI-shaped JSON error with the status a client's retry logic expects (502 for a broken or
unreachable upstream, 429 for rate limits and a spent budget, 504 for one that does not answer in
time), never aiohttp's 500 text/plain."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web

from evomerge_sdk import MergedSpec
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.local.server import LocalService

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _spec(repo: Repository) -> MergedSpec:
    target = repo.targets()[0]
    return MergedSpec(
        mode="output",
        pool=repo.pool(target, 4, 0),
        alpha=(1.0, 0.0, 0.7, 1.0),
        beta=(0.5, 0.4, -0.3, 0.2),
        reference="base",
        answer_set=tuple(repo.tokenizer.tokens[int(i)] for i in target.test.answer_ids),
        source={"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},
        name="merged-hostile",
    )


@asynccontextmanager
async def _upstream(handler: Handler) -> AsyncIterator[str]:
    """A loopback OpenAI-compatible upstream that misbehaves as `handler` says; yields its /v1 URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def _serve(path: Path, *flags: str) -> AsyncIterator[str]:
    """`evomerge serve PATH --port 0 FLAGS...`; yields its chat-completions URL."""
    cmd = [sys.executable, "-m", "evomerge_sdk.cli", "serve", str(path), "--port", "0", *flags]
    async with await anyio.open_process(cmd, env=dict(os.environ)) as proc:
        assert proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive(1)
            assert chunk, "evomerge serve exited before it listened"
            line += chunk
        try:
            yield json.loads(line)["base_url"] + "/chat/completions"
        finally:
            proc.terminate()
            await proc.wait()


async def _ask(url: str, prompt: str, model: str = "merged-hostile") -> tuple[int, str, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as reply:
        text = await reply.text()
    try:
        data = json.loads(text)
    except ValueError:
        data = {"not JSON": text}
    return reply.status, reply.content_type, data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _write(repo: Repository, tmp_path: Path) -> Path:
    path = tmp_path / "merged.json"
    path.write_text(json.dumps(_spec(repo).to_dict()), encoding="utf-8")
    return path


def _refused_as_json(status: int, content_type: str, body: dict[str, Any], expected: int) -> None:
    assert (status, content_type) == (expected, "application/json"), body
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"] and "ExceptionGroup" not in error["message"]


@pytest.mark.anyio
async def test_an_unreachable_upstream_is_a_502_json(repo: Repository, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    async with _serve(_write(repo, tmp_path), "--base-url", dead) as url:
        _refused_as_json(*await _ask(url, repo.targets()[0].test.prompts[0]), 502)


@pytest.mark.anyio
async def test_an_upstream_answering_500_is_a_502_json(repo: Repository, tmp_path: Path) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="Server got itself in trouble")

    async with _upstream(broken) as base, _serve(_write(repo, tmp_path), "--base-url", base) as url:
        _refused_as_json(*await _ask(url, repo.targets()[0].test.prompts[0]), 502)


@pytest.mark.anyio
async def test_an_upstream_rate_limit_is_a_429_json(repo: Repository, tmp_path: Path) -> None:
    async def limited(request: web.Request) -> web.Response:
        body = {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}}
        return web.json_response(body, status=429, headers={"Retry-After": "0"})

    async with _upstream(limited) as base, _serve(_write(repo, tmp_path), "--base-url", base) as url:
        _refused_as_json(*await _ask(url, repo.targets()[0].test.prompts[0]), 429)


@pytest.mark.anyio
async def test_an_upstream_that_never_answers_is_a_504_json(repo: Repository, tmp_path: Path) -> None:
    async def hang(request: web.Request) -> web.Response:
        await anyio.sleep(60)
        raise AssertionError("unreachable")

    flags = ("--timeout", "0.5")
    async with _upstream(hang) as base, _serve(_write(repo, tmp_path), "--base-url", base, *flags) as url:
        _refused_as_json(*await _ask(url, repo.targets()[0].test.prompts[0]), 504)


@pytest.mark.anyio
async def test_a_spent_budget_is_a_429_json(repo: Repository, tmp_path: Path) -> None:
    prompts = repo.targets()[0].test.prompts
    async with LocalService(repo, pool_sizes=(4,)) as service:
        # Enough for the first answer (4 queries of about 30 tokens each) and not for many more.
        flags = ("--base-url", f"{service.url}/v1", "--budget", "150")
        async with _serve(_write(repo, tmp_path), *flags) as url:
            first = await _ask(url, prompts[0])
            assert first[0] == 200, first
            outcomes = [await _ask(url, p) for p in prompts[1:6]]
    assert any(status == 429 for status, _, _ in outcomes), outcomes
    for outcome in outcomes:
        if outcome[0] != 200:
            _refused_as_json(*outcome, 429)
            assert outcome[2]["error"]["code"] == "insufficient_quota"
