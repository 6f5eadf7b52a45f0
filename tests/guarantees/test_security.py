"""Security: the API key never reaches a log, checkpoint, cache, result file or error message; TLS is
verified unless turned off explicitly; the embedded service compares tokens in constant time, listens on
127.0.0.1 by default, caps body size and session count; cache and checkpoint files are user-only."""

from __future__ import annotations

import hmac
import json
import os
import shutil
import signal
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from evomerge_anthropic import AnthropicProvider
from evomerge_openai import OpenAIProvider

from evomerge_sdk.errors import (
    AuthenticationError,
    BadResponse,
    ConfigError,
    ConnectionFailed,
    InvalidRequest,
    ProviderError,
    ServerError,
)
from evomerge_sdk.http import server as http_server
from evomerge_sdk.local import preset_id
from evomerge_sdk.local.repository import Repository
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.providers import ChatRequest, Usage
from evomerge_sdk.scheduler import RetryPolicy, Scheduler
from evomerge_sdk.service import MergeServiceClient

KEY = "sk-evomerge-TEST-7f3a9c1e5b2d8f4a6c0e"
DRIVER = Path(__file__).resolve().parents[1] / "_resume_driver.py"
PRESET = preset_id("ood:ner/news", 5)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _assert_no_key(folder: Path, *texts: str) -> None:
    needle = KEY.encode()
    leaked = [str(p) for p in _files(folder) if needle in p.read_bytes()]
    leaked += [f"text #{i}" for i, t in enumerate(texts) if KEY in t]
    assert not leaked, f"the API key was written to {leaked}"


# -- a whole run with a key: grep every artefact ----------------------------------------------------
def test_no_artefact_of_an_authenticated_run_contains_the_key(tmp_path: Path) -> None:
    """Server and search in their own processes, logging at DEBUG; then every file and stream is read."""
    env = {**os.environ, "EVOMERGE_API_KEY": KEY}
    server_log = tmp_path / "server.log"
    with server_log.open("w") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "evomerge_sdk.cli", "-vv", "serve-local", "--small", "--port", "0",
             "--pool-sizes", "5", "--output-dir", str(tmp_path / "merged")],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=tmp_path,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            url = json.loads(server.stdout.readline())["url"]
            args = [sys.executable, str(DRIVER), "--url", url, "--checkpoint", str(tmp_path / "ck.json"),
                    "--cache", str(tmp_path / "cache.sqlite"), "--out", str(tmp_path / "result.json"),
                    "--log", str(tmp_path / "client.jsonl")]  # fmt: skip
            run = subprocess.run(
                [*args, "--api-key-env", "EVOMERGE_API_KEY"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert run.returncode == 0, run.stderr
            # The same run with a wrong key: refused, and the refusal names no key either.
            wrong = subprocess.run(
                [*args, "--api-key-env", "WRONG_KEY"],
                env={**env, "WRONG_KEY": KEY[::-1]},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert wrong.returncode != 0 and "AuthenticationError" in wrong.stderr
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=10)
    assert json.loads((tmp_path / "result.json").read_text())["result"]["loss"] > 0
    log = (tmp_path / "client.jsonl").read_text()
    assert '"event": "request"' in log and '"level": "debug"' in log  # DEBUG events were written
    names = {p.name for p in _files(tmp_path)}
    assert {"ck.json", "cache.sqlite", "result.json", "client.jsonl", "server.log"} <= names
    _assert_no_key(tmp_path, run.stdout, run.stderr, wrong.stdout, wrong.stderr)
    # The SDK's own files are user-only (the SQLite cache with its journal files, checkpoint, result).
    for path in _files(tmp_path):
        if path.name.startswith(("cache.sqlite", "ck.json", "result.json")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


# -- errors never carry the key, whatever the server sends back -------------------------------------
@asynccontextmanager
async def careless_server(status: int) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        quoted = json.dumps(dict(request.headers))
        if status == 200:
            return web.Response(status=200, text="not json, but the headers: " + quoted)
        return web.json_response({"error": {"type": "oops", "message": quoted}}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


Call = Callable[[str, Scheduler], Awaitable[Any]]


async def _openai(url: str, scheduler: Scheduler) -> Any:
    async with OpenAIProvider(base_url=url, api_key=KEY) as p:
        assert KEY not in repr(p)
        return await scheduler.complete(p, ChatRequest(model="gpt-4o-mini", messages="hi", max_tokens=2))


async def _anthropic(url: str, scheduler: Scheduler) -> Any:
    async with AnthropicProvider(base_url=url, api_key=KEY) as p:
        assert KEY not in repr(p)
        return await scheduler.complete(p, ChatRequest(model="claude-3-5-haiku", messages="hi", max_tokens=2))


async def _service(url: str, scheduler: Scheduler) -> Any:
    async with MergeServiceClient(url, api_key=KEY, scheduler=scheduler) as client:
        assert KEY not in repr(client)
        return await client.presets()


@pytest.mark.anyio
@pytest.mark.parametrize("client", [_openai, _anthropic, _service], ids=["openai", "anthropic", "service"])
@pytest.mark.parametrize(
    ("status", "error"),
    [(200, BadResponse), (401, AuthenticationError), (400, InvalidRequest), (500, ServerError)],
)
async def test_errors_never_quote_the_key_even_when_the_server_does(
    client: Call, status: int, error: type[ProviderError], tmp_path: Path
) -> None:
    from structlog.testing import capture_logs

    retry = RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0)
    with capture_logs() as logs:
        async with careless_server(status) as url, Scheduler(retry=retry, cache=tmp_path / "c.sqlite") as s:
            with pytest.raises(error) as raised:
                await client(url, s)
    exc = raised.value
    chain = []
    cause: BaseException | None = exc
    while cause is not None:
        chain += [str(cause), repr(cause)]
        cause = cause.__cause__ or cause.__context__
    assert "headers" in str(exc) or exc.status == status  # the server's text is quoted, redacted
    _assert_no_key(tmp_path, *chain, repr(logs))


# -- TLS -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@asynccontextmanager
async def https_server(cert: Path, key: Path) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        body = {
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            ],
            "model": "gpt-4o-mini",
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
        return web.json_response(body)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@pytest.mark.anyio
async def test_tls_is_verified_unless_turned_off_explicitly(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    request = ChatRequest(model="gpt-4o-mini", messages="hi", max_tokens=1)
    async with https_server(cert, key) as url:
        async with OpenAIProvider(base_url=url, api_key=KEY) as default:
            with pytest.raises(ConnectionFailed, match=r"(?i)certificate") as refused:
                await default.complete(request)
            assert KEY not in str(refused.value)
        trusted = ssl.create_default_context(cafile=str(cert))
        async with OpenAIProvider(base_url=url, api_key=KEY, verify_tls=trusted) as private_ca:
            assert (await private_ca.complete(request)).text == "ok"
        async with OpenAIProvider(base_url=url, api_key=KEY, verify_tls=False) as unverified:
            assert (await unverified.complete(request)).text == "ok"
    for make in (
        lambda v: OpenAIProvider(base_url="https://x.test/v1", api_key=KEY, verify_tls=v),
        lambda v: AnthropicProvider(base_url="https://x.test", api_key=KEY, verify_tls=v),
        lambda v: MergeServiceClient("https://x.test", verify_tls=v),
    ):
        assert make(True)._http._ssl is True and make(False)._http._ssl is False
        with pytest.raises(ConfigError, match="verify_tls"):
            make("no")  # a truthy string must not silently mean anything
    # Verification is the default of every client.
    assert OpenAIProvider(base_url="https://x.test/v1", api_key=KEY)._http._ssl is True
    assert AnthropicProvider(base_url="https://x.test", api_key=KEY)._http._ssl is True
    assert MergeServiceClient("https://x.test")._http._ssl is True


# -- the embedded service's own defences -----------------------------------------------------------
@pytest.mark.anyio
async def test_service_binds_loopback_by_default_and_needs_a_key_elsewhere(repo: Repository) -> None:
    async with LocalService(repo, pool_sizes=(5,)) as svc:
        assert svc.host == "127.0.0.1" and svc.url.startswith("http://127.0.0.1:")
        assert svc._runner is not None and svc._runner.addresses[0][0] == "127.0.0.1"
    with pytest.raises(ConfigError, match="needs an api_key"):
        LocalService(repo, host="0.0.0.0")
    assert KEY not in repr(LocalService(repo, api_key=KEY))


@pytest.mark.anyio
async def test_bearer_tokens_are_compared_in_constant_time(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return original(a, b)

    assert vars(http_server)["hmac"] is hmac  # the servers call hmac.compare_digest through the server kit
    monkeypatch.setattr(hmac, "compare_digest", spy)
    async with LocalService(repo, pool_sizes=(5,), api_key=KEY) as svc, aiohttp.ClientSession() as http:
        for token, want in ((KEY, 200), (KEY[:-1], 401), ("", 401), (KEY + "x", 401)):
            async with http.get(f"{svc.url}/v1/presets", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == want
                text = await r.text()
                assert KEY not in text
        async with http.get(f"{svc.url}/v1/presets") as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert [a for a, _ in seen] == [KEY.encode(), KEY[:-1].encode(), b"", (KEY + "x").encode()]
    assert all(b == KEY.encode() for _, b in seen)


@pytest.mark.anyio
async def test_service_caps_body_size_and_session_count(repo: Repository) -> None:
    async with (
        LocalService(repo, pool_sizes=(5,), max_body_bytes=4096, max_sessions=2) as svc,
        aiohttp.ClientSession() as http,
    ):
        huge = json.dumps({"preset_id": PRESET, "query_plus": {"dataset": "x" * 10_000}})
        async with http.post(
            f"{svc.url}/v1/sessions", data=huge, headers={"Content-Type": "application/json"}
        ) as r:
            body = await r.json()
            assert r.status == 413 and "4096 bytes" in body["error"]["message"]
        assert svc.open_sessions == 0
        ids = []
        for _ in range(2):
            async with http.post(f"{svc.url}/v1/sessions", json={"preset_id": PRESET}) as r:
                assert r.status == 200
                ids.append((await r.json())["session_id"])
        async with http.post(f"{svc.url}/v1/sessions", json={"preset_id": PRESET}) as r:
            body = await r.json()
            assert r.status == 503 and "at most 2 open sessions" in body["error"]["message"]
            assert int(r.headers["Retry-After"]) >= 1
        assert svc.open_sessions == 2
        async with http.delete(f"{svc.url}/v1/sessions/{ids[0]}") as r:
            assert r.status == 200
        async with http.post(f"{svc.url}/v1/sessions", json={"preset_id": PRESET}) as r:
            assert r.status == 200
        # A huge evaluate body is refused before any work; the session stays usable.
        vec = np.full(5, 0.5).tolist()
        url = f"{svc.url}/v1/sessions/{ids[1]}/evaluate"
        async with http.post(url, json={"alpha": vec, "beta": vec, "tag": "t" * 8000}) as r:
            assert r.status == 413
        async with http.post(url, json={"alpha": vec, "beta": vec}) as r:
            assert r.status == 200
        assert svc.stats.served_requests == 1


@pytest.mark.anyio
async def test_cache_files_are_user_only_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        async with Scheduler(cache=tmp_path / "c.sqlite") as s:
            await s.call(_one_token, model="m", reserve=_ONE, cache_key="k")
            await s.flush()
            modes = _modes(tmp_path)
    finally:
        os.umask(old)
    assert {"c.sqlite", "c.sqlite-wal"} <= set(modes)
    assert all(mode == 0o600 for mode in modes.values()), modes


_ONE = Usage(1, 0)


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


async def _one_token() -> tuple[str, Usage]:
    return "value", _ONE
