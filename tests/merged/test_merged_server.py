"""`evomerge serve`: the official `openai` client gets valid chat completions, with usage, from a merged
model served in process and from the CLI (which starts the embedded service itself); auth, body cap and
OpenAI-shaped refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletion

from evomerge_sdk.errors import ConfigError
from evomerge_sdk.local.server import LocalService
from evomerge_sdk.merged import MergedModelServer, MergedSpec, open_merged, save_spec

KEY = "sk-merged-test-key"


def _spec(repository: Any) -> MergedSpec:
    target = repository.targets()[0]
    tokens = repository.tokenizer.tokens
    return MergedSpec(
        mode="output",
        pool=repository.pool(target, 4, 0),
        alpha=(1.0, 0.0, 0.7, 1.0),
        beta=(0.5, 0.4, -0.3, 0.2),
        reference="base",
        answer_set=tuple(tokens[int(i)] for i in target.test.answer_ids),
        source={
            "kind": "embedded",
            "repository_seed": 0,
            "repo": True,
            "pool_seed": 0,
            "pool_size": 4,
        },
        name="merged-test",
    )


@pytest.fixture
async def server(repo: Any) -> AsyncIterator[MergedModelServer]:
    async with LocalService(repo, pool_sizes=(4,)) as service:
        spec = _spec(repo)
        async with (
            open_merged(spec, base_url=f"{service.url}/v1") as merged,
            MergedModelServer(merged, api_key=KEY, max_body_bytes=4096) as s,
        ):
            yield s


@pytest.mark.anyio
async def test_the_official_client_gets_a_valid_completion_with_usage(
    server: MergedModelServer, repo: Any
) -> None:
    spec = server.model.spec
    prompt = repo.targets()[0].test.prompts[0]
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        answer = await client.chat.completions.create(
            model="merged-test",
            messages=[
                {"role": "system", "content": "Answer with one label."},
                {"role": "user", "content": prompt},
            ],
            logprobs=True,
            top_logprobs=3,
        )
        assert isinstance(answer, ChatCompletion)
        assert answer.model == "merged-test" and answer.object == "chat.completion"
        content = answer.choices[0].message.content
        assert content in spec.answer_set
        assert answer.usage is not None and answer.usage.total_tokens > 0
        # base + the three pool models with non-zero alpha and beta, one token each
        assert answer.usage.completion_tokens == 4
        assert answer.choices[0].logprobs is not None and answer.choices[0].logprobs.content is not None
        assert len(answer.choices[0].logprobs.content[0].top_logprobs) == 3
        models = await client.models.list()
        assert [m.id for m in models.data] == ["merged-test"]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": prompt}]
            )
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="merged-test", messages=[{"role": "user", "content": prompt}], n=2
            )
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(
                model="merged-test", messages=[{"role": "user", "content": "x"}]
            )
    async with aiohttp.ClientSession() as session:
        big = {"model": "merged-test", "messages": [{"role": "user", "content": "x" * 10_000}]}
        headers = {"Authorization": f"Bearer {KEY}"}
        async with session.post(f"{server.url}/v1/chat/completions", json=big, headers=headers) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["type"] == "request_too_large"
        async with session.post(f"{server.url}/v1/chat/completions", data=b"{", headers=headers) as resp:
            assert resp.status == 400
        async with session.get(f"{server.url}/v1/nothing", headers=headers) as resp:
            assert resp.status == 404
            message = (await resp.json())["error"]["message"]
            assert message.startswith("no route GET /v1/nothing: this server has GET /health")
    assert server.requests == 1


class _NeverCalled:
    """A provider for servers that must refuse before any completion is asked for."""

    name = "openai"

    async def complete(self, request: Any) -> Any:
        raise AssertionError("not called")

    async def aclose(self) -> None:
        return None


class _Crashing:
    """A served model with a bug: its completion raises something no refusal maps."""

    name = "crashing"

    async def complete(self, messages: Any, *, max_tokens: int | None = None) -> Any:
        raise RuntimeError("internal detail sk-do-not-echo")


@pytest.mark.anyio
async def test_a_crash_is_a_json_server_error_that_quotes_nothing() -> None:
    body = {"model": "crashing", "messages": [{"role": "user", "content": "hi"}]}
    async with (
        MergedModelServer(_Crashing()) as server,
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}/v1/chat/completions", json=body) as reply,
    ):
        text = await reply.text()
    assert (reply.status, reply.content_type) == (500, "application/json")
    assert json.loads(text)["error"]["type"] == "server_error"  # not the client's fault
    assert "sk-do-not-echo" not in text and "RuntimeError" not in text


def test_non_loopback_needs_a_key(repo: Any) -> None:
    from evomerge_sdk.merged import MergedModel

    merged = MergedModel(_spec(repo), provider=_NeverCalled())
    with pytest.raises(ConfigError, match="api_key"):
        MergedModelServer(merged, host="0.0.0.0")


@pytest.mark.parametrize(
    "key, needle", [("sk-key\n", "surrounding whitespace"), ("sk-\u00e9", "printable ASCII")]
)
def test_a_key_no_client_could_send_is_refused_at_configuration(repo: Any, key: str, needle: str) -> None:
    # A trailing newline from a file or an environment variable would lock every client out.
    from evomerge_sdk.merged import MergedModel

    merged = MergedModel(_spec(repo), provider=_NeverCalled())
    with pytest.raises(ConfigError, match=needle) as caught:
        MergedModelServer(merged, api_key=key)
    assert key.strip() not in str(caught.value)


@pytest.mark.anyio
async def test_a_port_in_use_is_named_and_nothing_stays_open(repo: Any) -> None:
    import socket

    from evomerge_sdk.merged import MergedModel

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MergedModelServer(MergedModel(_spec(repo), provider=_NeverCalled()), port=port)
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            async with server:
                raise AssertionError("started on a taken port")
    # The failed start left nothing running: the same object starts on a free port afterwards.
    server.port = 0
    async with server:
        assert server.port != port


def test_bearer_and_loopback_checks() -> None:
    from evomerge_sdk.http import bearer_matches, is_loopback

    assert bearer_matches("Bearer k-1", b"k-1") and bearer_matches("bearer  k-1 ", b"k-1")
    assert not bearer_matches("Bearer k-2", b"k-1") and not bearer_matches("Basic k-1", b"k-1")
    assert not bearer_matches("", b"k-1") and not bearer_matches("k-1", b"k-1")
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "example.com", "::"))


def test_cli_serve_starts_the_embedded_service_and_answers_the_openai_client(
    repo: Any, tmp_path: Path
) -> None:
    path = save_spec(_spec(repo), tmp_path / "merged.json")
    env = {**os.environ, "EVOMERGE_API_KEY": KEY}
    cmd = [sys.executable, "-m", "evomerge_sdk.cli", "serve", str(path), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        info = json.loads(line)
        client = openai.OpenAI(base_url=info["base_url"], api_key=KEY, max_retries=0)
        prompt = repo.targets()[0].test.prompts[1]
        answer = client.chat.completions.create(
            model=info["model"], messages=[{"role": "user", "content": prompt}]
        )
        assert isinstance(answer, ChatCompletion)
        assert answer.choices[0].message.content in _spec(repo).answer_set
        assert answer.usage is not None and answer.usage.prompt_tokens > 0
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
    assert status == 0


@pytest.mark.anyio
async def test_provider_side_merge_served_to_the_official_client(repo: Any) -> None:
    from evomerge_sdk.local import preset_id

    target = repo.targets()[0]
    async with LocalService(repo, pool_sizes=(4,)) as service:
        spec = MergedSpec(
            mode="provider",
            pool=repo.pool(target, 4, 0),
            alpha=(1.0, 0.5, 0.0, 1.0),
            beta=(0.5, 0.5, 0.2, -0.1),
            preset_id=preset_id(target.name, 4),
            name="merged-weights",
        )
        async with (
            open_merged(spec, base_url=service.url) as merged,
            MergedModelServer(merged) as server,
            openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client,
        ):
            answer = await client.chat.completions.create(
                model="merged-weights",
                messages=[{"role": "user", "content": target.test.prompts[0]}],
                logprobs=True,
                top_logprobs=5,
            )
    assert isinstance(answer, ChatCompletion)
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens == 1 and answer.usage.prompt_tokens > 0
    assert answer.choices[0].logprobs is not None and answer.choices[0].logprobs.content is not None
    assert len(answer.choices[0].logprobs.content[0].top_logprobs) == 5
