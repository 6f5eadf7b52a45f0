"""The Anthropic adapter against loopback servers whose wire format the official `anthropic` types check."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from evomerge_anthropic import AnthropicProvider, parse_rate_limits
from wire_servers import (
    DELETE,
    Answer,
    AnthropicWireServer,
    Drop,
    Failure,
    Hang,
    Raw,
    Truncate,
    edit,
    make_self_signed,
    serve,
)

from evomerge_sdk import (
    AuthenticationError,
    BadResponse,
    ChatRequest,
    ConfigError,
    ConnectionFailed,
    InvalidRequest,
    Provider,
    RateLimited,
    RateLimitInfo,
    RequestTimeout,
    RetryableError,
    ServerError,
    Usage,
    available_providers,
    load_provider,
)

pytestmark = pytest.mark.anyio

MODEL = "claude-sonnet-4-5"
QUESTION = ChatRequest(model=MODEL, messages="What is the capital of France?", max_tokens=16)
NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the environment variables they set."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def server() -> AsyncIterator[AnthropicWireServer]:
    async with serve(AnthropicWireServer()) as running:
        yield running


@pytest.fixture
async def provider(server: AnthropicWireServer) -> AsyncIterator[AnthropicProvider]:
    async with AnthropicProvider(base_url=server.base_url, api_key=server.api_key, timeout=5) as opened:
        yield opened


def _iso(seconds_from_now: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)).strftime("%Y-%m-%dT%H:%M:%SZ")


# Success paths -------------------------------------------------------------------------------------------


async def test_completion_carries_text_usage_and_rate_limits(
    server: AnthropicWireServer, provider: AnthropicProvider
) -> None:
    server.headers.update(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": _iso(1),
            "anthropic-ratelimit-tokens-limit": "80000",
            "anthropic-ratelimit-tokens-remaining": "8000",
            "anthropic-ratelimit-tokens-reset": _iso(45),
        }
    )
    server.push(Answer(text="Paris.", cached_tokens=100, cache_write_tokens=20))
    completion = await provider.complete(QUESTION)

    sent = server.sent[0]
    assert completion.text == "Paris."
    assert completion.model == MODEL and completion.finish_reason == "end_turn"
    assert completion.logprobs is None
    # input_tokens counts all billed input: uncached + cache writes + cache reads; cached_tokens = reads.
    assert completion.usage == Usage(
        sent.usage.input_tokens + 20 + 100, sent.usage.output_tokens, cached_tokens=100
    )
    limits = completion.rate_limits
    assert limits is not None
    assert (limits.requests_limit, limits.requests_remaining) == (50, 49)
    assert (limits.tokens_limit, limits.tokens_remaining) == (80000, 8000)
    # The token window is the binding one (10% left), so its reset is reported, not the requests' 1 s.
    assert limits.reset_seconds is not None and 1 < limits.reset_seconds <= 45

    received = server.received[0]
    assert received.headers["x-api-key"] == server.api_key
    assert received.headers["anthropic-version"] == "2023-06-01"
    assert received.body == {
        "model": MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }


async def test_system_prompt_is_lifted_and_same_role_turns_are_merged(
    server: AnthropicWireServer, provider: AnthropicProvider
) -> None:
    request = ChatRequest(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Context: France."},
            {"role": "user", "content": "Capital?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "system", "content": "Answer in English."},
            {"role": "user", "content": "And Italy?"},
        ],
        temperature=0.0,
        extra={"stop_sequences": ["\n\n"], "metadata": {"user_id": "evomerge-test"}},
    )
    await provider.complete(request)
    body = server.received[0].body
    assert body["system"] == "Be brief.\n\nAnswer in English."
    assert body["messages"] == [
        {"role": "user", "content": "Context: France.\n\nCapital?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"},
    ]
    assert body["temperature"] == 0.0
    assert body["stop_sequences"] == ["\n\n"] and body["metadata"] == {"user_id": "evomerge-test"}


async def test_logprobs_are_refused_with_a_clear_error(
    server: AnthropicWireServer, provider: AnthropicProvider
) -> None:
    assert provider.supports_logprobs is False
    for request in (
        ChatRequest(model=MODEL, messages="hi", logprobs=True),
        ChatRequest(model=MODEL, messages="hi", top_logprobs=3),
    ):
        with pytest.raises(ConfigError, match=r"no logprobs.*sampled answers"):
            await provider.complete(request)
    assert server.received == []


async def test_a_system_prompt_alone_is_refused(provider: AnthropicProvider) -> None:
    with pytest.raises(ConfigError, match="at least one user or assistant"):
        await provider.complete(ChatRequest(model=MODEL, messages=[{"role": "system", "content": "x"}]))


async def test_only_text_blocks_make_the_text(
    server: AnthropicWireServer, provider: AnthropicProvider
) -> None:
    def add_thinking(data: dict[str, Any]) -> None:
        data["content"].insert(0, {"type": "thinking", "thinking": "hmm", "signature": "sig"})
        data["content"].append({"type": "text", "text": " Really.", "citations": None})

    server.push(Answer(text="Paris.", mutate=add_thinking))
    assert (await provider.complete(QUESTION)).text == "Paris. Really."


# Error statuses --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure, kind",
    [
        (Failure(400, "invalid_request_error", "max_tokens: field required"), InvalidRequest),
        (Failure(401, "authentication_error", "invalid x-api-key"), AuthenticationError),
        (Failure(402, "billing_error", "Your credit balance is too low"), InvalidRequest),
        (Failure(403, "permission_error", "no access to this model"), AuthenticationError),
        (Failure(404, "not_found_error", "model: claude-9"), InvalidRequest),
        (
            Failure(413, "invalid_request_error", "Request exceeds the maximum allowed number of bytes"),
            InvalidRequest,
        ),
        (
            Failure(
                429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"
            ),
            RateLimited,
        ),
        (Failure(500, "api_error", "Internal server error"), ServerError),
        (Failure(504, "timeout_error", "Gateway timeout"), ServerError),
        (Failure(529, "overloaded_error", "Overloaded"), ServerError),
    ],
)
async def test_every_error_status_maps_onto_the_sdk_errors(
    server: AnthropicWireServer, provider: AnthropicProvider, failure: Failure, kind: type[Exception]
) -> None:
    server.push(failure)
    with pytest.raises(kind) as caught:
        await provider.complete(QUESTION)
    err = caught.value
    assert type(err) is kind
    assert getattr(err, "status", None) == failure.status
    assert failure.message in str(err) and failure.error_type in str(err)
    assert isinstance(err, RetryableError) == (kind in (RateLimited, ServerError))


@pytest.mark.parametrize(
    "failure",
    [
        Failure(
            429, "rate_limit_error", "You have reached your spend limit", code="enforced_spend_limit_reached"
        ),
        Failure(429, "rate_limit_error", "Contract limit", code="contract_spend_limit_reached"),
        Failure(429, "rate_limit_error", "You have reached your specified workspace API usage limits."),
        Failure(429, "billing_error", "Your credit balance is too low to access the Anthropic API."),
        Failure(429, "rate_limit_error", "limits reached", headers={"x-should-retry": "false"}),
    ],
)
async def test_spend_limit_429_is_never_retried(
    server: AnthropicWireServer, provider: AnthropicProvider, failure: Failure
) -> None:
    server.push(failure)
    with pytest.raises(InvalidRequest, match="not retried") as caught:
        await provider.complete(QUESTION)
    assert caught.value.status == 429 and not isinstance(caught.value, RetryableError)


async def test_rate_limited_carries_retry_after_and_limits(
    server: AnthropicWireServer, provider: AnthropicProvider
) -> None:
    headers = {
        "retry-after": "12",
        "anthropic-ratelimit-input-tokens-limit": "40000",
        "anthropic-ratelimit-input-tokens-remaining": "0",
        "anthropic-ratelimit-input-tokens-reset": _iso(12),
        "anthropic-ratelimit-output-tokens-limit": "8000",
        "anthropic-ratelimit-output-tokens-remaining": "7000",
        "anthropic-ratelimit-output-tokens-reset": _iso(1),
    }
    server.push(Failure(429, "rate_limit_error", "input tokens per minute exceeded", headers=headers))
    with pytest.raises(RateLimited) as caught:
        await provider.complete(QUESTION)
    assert caught.value.retry_after == 12.0
    limits = caught.value.rate_limits  # type: ignore[attr-defined]
    # Without -tokens-* headers the exhausted input window stands for the token limit.
    assert (limits.tokens_limit, limits.tokens_remaining) == (40000, 0)
    assert limits.reset_seconds is not None and 1 < limits.reset_seconds <= 12


async def test_retry_after_ms_wins(server: AnthropicWireServer, provider: AnthropicProvider) -> None:
    server.push(
        Failure(529, "overloaded_error", "Overloaded", headers={"retry-after-ms": "250", "retry-after": "3"})
    )
    server.push(
        Failure(429, "rate_limit_error", "slow down", headers={"retry-after-ms": "250", "retry-after": "3"})
    )
    with pytest.raises(ServerError):
        await provider.complete(QUESTION)
    with pytest.raises(RateLimited) as caught:
        await provider.complete(QUESTION)
    assert caught.value.retry_after == 0.25


# Transport faults and malformed answers ------------------------------------------------------------------


@pytest.mark.parametrize("fault", [Drop(), Truncate()])
async def test_dropped_connections_are_connection_failures(
    server: AnthropicWireServer, provider: AnthropicProvider, fault: Drop | Truncate
) -> None:
    server.push(fault)
    with pytest.raises(ConnectionFailed):
        await provider.complete(QUESTION)
    assert (await provider.complete(QUESTION)).text


async def test_slow_answer_is_a_timeout(server: AnthropicWireServer) -> None:
    server.push(Hang())
    async with AnthropicProvider(base_url=server.base_url, api_key=server.api_key, timeout=0.2) as provider:
        with pytest.raises(RequestTimeout):
            await provider.complete(QUESTION)


@pytest.mark.parametrize(
    "reply, needle",
    [
        (Raw(200, b'{"type": "message", "content": [{"type": "te'), "not JSON"),
        (Raw(200, b"[]"), "not a JSON object"),
        (Answer(mutate=edit(("content",), DELETE)), "answer.content"),
        (Answer(mutate=edit(("content", 0, "text"), None)), "text"),
        (Answer(mutate=edit(("content", 0), "Paris")), "content"),
        (Answer(mutate=edit(("usage", "input_tokens"), "12")), "input_tokens"),
        (Answer(mutate=edit(("usage", "cache_read_input_tokens"), -1.5)), "cache_read_input_tokens"),
    ],
)
async def test_malformed_answers_are_bad_responses(
    server: AnthropicWireServer, provider: AnthropicProvider, reply: Answer | Raw, needle: str
) -> None:
    server.push(reply)
    with pytest.raises(BadResponse, match=needle):
        await provider.complete(QUESTION)


# Configuration and secrets ----------------------------------------------------------------------------


async def test_configuration_from_the_environment(
    server: AnthropicWireServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.api_key is not None
    monkeypatch.setenv("ANTHROPIC_API_KEY", server.api_key)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
    async with AnthropicProvider(
        version="2023-01-01", headers={"anthropic-beta": "token-counting-2024-11-01"}
    ) as p:
        await p.complete(QUESTION)
    headers = server.received[0].headers
    assert headers["x-api-key"] == server.api_key and headers["anthropic-version"] == "2023-01-01"
    assert headers["anthropic-beta"] == "token-counting-2024-11-01"


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({}, "ANTHROPIC_API_KEY"),
        ({"api_key": "k", "base_url": "api.anthropic.com"}, "absolute http"),
        ({"api_key": "k", "version": ""}, "anthropic-version"),
        ({"api_key": "k", "timeout": -1}, "timeout"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        AnthropicProvider(**kwargs)


async def test_api_key_never_appears_in_errors_repr_or_logs(
    server: AnthropicWireServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-ant-api03-SECRET-do-not-leak-4242"
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        async with AnthropicProvider(base_url=server.base_url, api_key=secret) as provider:
            with pytest.raises(AuthenticationError) as auth:
                await provider.complete(QUESTION)
            shown = repr(provider)
    assert "invalid x-api-key: ***" in str(auth.value)
    assert logs
    for text in (str(auth.value), repr(auth.value), shown, repr(logs), caplog.text):
        assert secret not in text


async def test_tls_is_verified_unless_explicitly_disabled(tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with serve(AnthropicWireServer(tls=server_tls)) as secure:
        async with AnthropicProvider(base_url=secure.base_url, api_key=secure.api_key) as strict:
            with pytest.raises(ConnectionFailed, match=r"(?i)certificate"):
                await strict.complete(QUESTION)
        async with AnthropicProvider(
            base_url=secure.base_url, api_key=secure.api_key, verify_tls=False
        ) as lax:
            assert (await lax.complete(QUESTION)).text


async def test_registered_under_the_providers_entry_point(server: AnthropicWireServer) -> None:
    assert available_providers()["anthropic"] is AnthropicProvider
    provider = load_provider("anthropic", base_url=server.base_url, api_key=server.api_key)
    try:
        assert isinstance(provider, AnthropicProvider) and isinstance(provider, Provider)
        assert provider.name == "anthropic"
        assert (await provider.complete(QUESTION)).text
    finally:
        await provider.aclose()


# Header parsing ------------------------------------------------------------------------------------------


def test_rate_limit_headers_with_a_fixed_clock() -> None:
    now = NOW.timestamp()
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2030-01-01T12:00:02Z",
        "anthropic-ratelimit-tokens-limit": "80000",
        "anthropic-ratelimit-tokens-remaining": "79000",
        "anthropic-ratelimit-tokens-reset": "2030-01-01T12:00:30.500000+00:00",
    }
    assert parse_rate_limits(headers, now=now) == RateLimitInfo(50, 0, 80000, 79000, reset_seconds=2.0)
    assert parse_rate_limits({}, now=now) is None
    # A reset in the past, or one that cannot be read, is no wait at all / unknown.
    stale = {
        "anthropic-ratelimit-requests-remaining": "3",
        "anthropic-ratelimit-requests-reset": "2029-12-31T00:00:00Z",
    }
    assert parse_rate_limits(stale, now=now) == RateLimitInfo(requests_remaining=3, reset_seconds=0.0)
    garbled = {"anthropic-ratelimit-tokens-remaining": "x", "anthropic-ratelimit-tokens-reset": "tomorrow"}
    assert parse_rate_limits(garbled, now=now) is None


# The validating server itself ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, headers, needle",
    [
        (lambda body: body.update(stop=["\n"]), {}, "stop"),
        (lambda body: body.pop("max_tokens"), {}, "max_tokens"),
        (lambda body: body["messages"][0].update(role="tool"), {}, "role"),
        (lambda body: body.update(system=7), {}, "system"),
        (lambda body: body.update(temperature=1.5), {}, "temperature"),
        (lambda body: None, {"anthropic-version": "2099-01-01"}, "anthropic-version"),
        (lambda body: None, {"Authorization": "Bearer x"}, "Authorization"),
    ],
)
async def test_the_server_rejects_requests_that_drift_from_the_api(
    server: AnthropicWireServer, change: Any, headers: dict[str, str], needle: str
) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    change(body)
    assert server.api_key is not None
    sent = {"x-api-key": server.api_key, "anthropic-version": "2023-06-01", **headers}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.base_url}/v1/messages", json=body, headers=sent) as resp,
    ):
        status, data = resp.status, await resp.json()
    assert status == 400 and data == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": server.violations[0]},
        "request_id": "req_wire",
    }
    assert len(server.violations) == 1 and needle in server.violations[0]
    server.violations.clear()
