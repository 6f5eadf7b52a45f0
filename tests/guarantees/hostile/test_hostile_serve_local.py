"""No input makes the embedded service (`serve-local`) answer 500, echo a credential, or open /stats.

Every hostile request gets a 4xx JSON error naming the field; the shared server kit answers header-level
garbage (a NUL or 0xff byte in `Authorization`) itself, without echoing the header.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from _loopback import raw_request

from evomerge_sdk import ConfigError
from evomerge_sdk.local import LocalService
from evomerge_sdk.local.repository import Repository

pytestmark = pytest.mark.anyio

KEY = "hostile-test-key-0123456789"
BIG = str(2**70)  # an index no int64 holds
CHAT = '"model": "base", "messages": [{"role": "user", "content": "hi"}]'


@pytest.fixture
async def keyed(repo: Repository) -> AsyncIterator[LocalService]:
    async with LocalService(repo, pool_sizes=(4,), api_key=KEY) as s:
        yield s


async def post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict[str, object]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as r:
        assert r.content_type == "application/json"
        return r.status, await r.json()


async def session_url(service: LocalService) -> str:
    """A fresh session's URL on `service` (the first preset)."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        async with http.get(f"{service.url}/v1/presets") as r:
            preset = (await r.json())["items"][0]["preset_id"]
        async with http.post(f"{service.url}/v1/sessions", json={"preset_id": preset}) as r:
            sid = (await r.json())["session_id"]
    return f"{service.url}/v1/sessions/{sid}"


@pytest.mark.parametrize("depth", [10_000, 200_000])
@pytest.mark.parametrize("route", ["/v1/sessions", "/v1/chat/completions", "evaluate"])
async def test_deeply_nested_json_is_a_400(keyed: LocalService, route: str, depth: int) -> None:
    url = f"{await session_url(keyed)}/evaluate" if route == "evaluate" else keyed.url + route
    body = b'{"alpha":' + b"[" * depth + b"]" * depth + b"}"
    status, answer = await post(url, body)
    assert status == 400
    assert "nested" in json.dumps(answer)


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("alpha", '{"alpha": [1e4000, 0, 0, 0], "beta": [0, 0, 0, 0]}'),
        ("beta", '{"alpha": [0, 0, 0, 0], "beta": [-1e4000, 0, 0, 0]}'),
        ("examples", '{"alpha": [0, 0, 0, 0], "beta": [0, 0, 0, 0], "examples": [{BIG}]}'),
        ("examples", '{"alpha": [0, 0, 0, 0], "beta": [0, 0, 0, 0], "examples": [-{BIG}]}'),
        ("examples", '{"alpha": [0, 0, 0, 0], "beta": [0, 0, 0, 0], "examples": [0, {BIG}]}'),
    ],
    ids=["alpha-1e4000", "beta-minus-1e4000", "index-2^70", "index-minus-2^70", "second-index-2^70"],
)
async def test_huge_numbers_are_a_422_naming_the_field(keyed: LocalService, field: str, text: str) -> None:
    text = text.replace("{BIG}", BIG)
    status, answer = await post(f"{await session_url(keyed)}/evaluate", text.encode())
    assert status == 422
    assert field in answer["error"]["message"]  # type: ignore[index]


@pytest.mark.parametrize(
    "text",
    [
        '{CHAT, "max_tokens": {BIG}}',
        '{CHAT, "temperature": 1e4000}',
        '{CHAT, "seed": {BIG}}',
        '{CHAT, "top_logprobs": 1e4000, "logprobs": true}',
    ],
    ids=["max_tokens", "temperature", "seed", "top_logprobs"],
)
async def test_chat_fields_out_of_range_are_a_4xx(keyed: LocalService, text: str) -> None:
    text = text.replace("{BIG}", BIG).replace("{CHAT", "{" + CHAT)
    status, answer = await post(f"{keyed.url}/v1/chat/completions", text.encode())
    assert 400 <= status < 500
    name = json.loads(text.replace("1e4000", "0"))
    assert any(k in answer["error"]["message"] for k in name if k not in ("model", "messages"))  # type: ignore[index]


@pytest.mark.parametrize("byte", [b"\x00", b"\xff"], ids=["NUL", "0xff"])
@pytest.mark.parametrize("with_key", [True, False], ids=["keyed", "open"])
async def test_a_garbage_authorization_header_is_a_4xx_that_never_echoes_it(
    repo: Repository, byte: bytes, with_key: bool
) -> None:
    async with LocalService(repo, pool_sizes=(4,), api_key=KEY if with_key else None) as service:
        secret = b"Bearer " + KEY.encode() + byte + b"tail-of-the-secret"
        head = b"GET /v1/presets HTTP/1.1\r\nHost: x\r\nAuthorization: " + secret
        status, headers, body = await raw_request(service.url, head)
    assert 400 <= status < 500
    assert KEY.encode() not in body and b"tail-of-the-secret" not in body
    assert headers.get("content-type", "").startswith("application/json")


async def test_stats_needs_the_key_when_one_is_set(keyed: LocalService) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{keyed.url}/stats") as r:
            assert r.status == 401
        async with http.get(f"{keyed.url}/stats", headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200
        async with http.get(f"{keyed.url}/health") as r:  # health stays open for probes
            assert r.status == 200


@pytest.mark.parametrize("key", [" padded", "padded ", "\tpadded", "padded\n"])
def test_a_key_with_surrounding_whitespace_is_refused_at_configuration(repo: Repository, key: str) -> None:
    with pytest.raises(ConfigError, match="whitespace") as caught:
        LocalService(repo, api_key=key)
    assert "padded" not in str(caught.value)
