"""Redaction before truncation, for every configured key, whatever its shape.

A server that echoes the key (in a JSON error message or in a non-JSON body, anywhere, near a
truncation boundary) never gets any part of it into an error message or a log event.
"""

from __future__ import annotations

import json

import pytest
from _loopback import Hostile, hostile
from aiohttp import web
from evomerge_anthropic import AnthropicProvider
from evomerge_openai import OpenAIProvider
from structlog.testing import capture_logs

from evomerge_sdk import ChatRequest, ProviderError
from evomerge_sdk.scheduler import RetryPolicy, Scheduler

pytestmark = pytest.mark.anyio

AZURE_KEY = "0123456789abcdef0123456789abcdef"  # Azure OpenAI keys: 32 hex characters, no prefix
ODD_KEY = "tok.2f9Q~x" + "z" * 30  # a self-hosted gateway's key: no recognisable shape at all


def leaks(text: str, key: str) -> bool:
    """Whether any 8-character piece of `key` shows in `text`."""
    return any(key[i : i + 8] in text for i in range(len(key) - 7))


@pytest.mark.parametrize("key", [AZURE_KEY, ODD_KEY], ids=["azure-hex", "odd-shape"])
@pytest.mark.parametrize("offset", [0, 150, 185, 195, 200, 290, 299])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
async def test_an_echoed_key_is_masked_before_any_cut(key: str, offset: int, as_json: bool) -> None:
    async def handler(request: web.Request, server: Hostile) -> web.StreamResponse:
        text = "x" * offset + f"invalid credential {key} for this deployment" + "y" * 400
        if as_json:
            error = {"error": {"message": text, "type": "invalid_request_error"}}
            return web.json_response(error, status=400)
        return web.Response(text=text, status=400, content_type="text/plain")

    async with hostile(handler) as server:
        provider = (
            OpenAIProvider(azure=True, base_url=server.url, api_key=key, api_version="2024-10-21")
            if key == AZURE_KEY
            else OpenAIProvider(base_url=server.url, api_key=key)
        )
        with capture_logs() as logs:
            async with provider, Scheduler(retry=RetryPolicy(max_attempts=1), cache=False) as scheduler:
                with pytest.raises(ProviderError) as caught:
                    await scheduler.complete(provider, ChatRequest(model="gpt-4o-mini", messages="hi"))
    assert not leaks(str(caught.value), key)
    assert not leaks(json.dumps(logs, default=str), key)


async def test_anthropic_keys_of_any_shape_are_masked_too() -> None:
    key = "plain-" + "q" * 40

    async def handler(request: web.Request, server: Hostile) -> web.StreamResponse:
        return web.Response(text="z" * 190 + key, status=401, content_type="text/plain")

    async with hostile(handler) as server, AnthropicProvider(base_url=server.url, api_key=key) as provider:
        with capture_logs() as logs:
            async with Scheduler(retry=RetryPolicy(max_attempts=1), cache=False) as scheduler:
                with pytest.raises(ProviderError) as caught:
                    await scheduler.complete(provider, ChatRequest(model="claude-3-5-haiku", messages="hi"))
    assert not leaks(str(caught.value), key)
    assert not leaks(json.dumps(logs, default=str), key)
