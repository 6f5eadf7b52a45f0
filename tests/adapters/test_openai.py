"""The OpenAI adapter against loopback servers whose wire format is checked by the official `openai` types."""

from __future__ import annotations

import email.utils
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from evomerge_openai import OpenAIProvider
from wire_servers import (
    DELETE,
    Answer,
    Drop,
    Failure,
    Hang,
    OpenAIWireServer,
    Raw,
    Truncate,
    edit,
    make_self_signed,
    serve,
)

from evomerge_sdk import (
    AuthenticationError,
    BadResponse,
    Budget,
    ChatRequest,
    ConfigError,
    ConnectionFailed,
    InvalidRequest,
    Provider,
    RateLimited,
    RateLimitInfo,
    RequestTimeout,
    RetryableError,
    Scheduler,
    ServerError,
    TokenLogprob,
    Usage,
    UsageError,
    available_providers,
    load_provider,
)
from evomerge_sdk.http import parse_duration, parse_openai_rate_limits

pytestmark = pytest.mark.anyio

QUESTION = ChatRequest(model="gpt-4o-mini", messages="What is the capital of France?", max_tokens=16)
OPENAI_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID")
AZURE_ENV = ("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the environment variables they set."""
    for name in OPENAI_ENV + AZURE_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def server() -> AsyncIterator[OpenAIWireServer]:
    async with serve(OpenAIWireServer()) as running:
        yield running


@pytest.fixture
async def provider(server: OpenAIWireServer) -> AsyncIterator[OpenAIProvider]:
    async with OpenAIProvider(base_url=server.base_url, api_key=server.api_key, timeout=5) as opened:
        yield opened


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed(tmp_path_factory.mktemp("tls"))


# Success paths -------------------------------------------------------------------------------------------


async def test_completion_carries_text_logprobs_usage_and_rate_limits(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    server.headers.update(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "12000",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    server.push(Answer(text="Paris is the capital.", cached_tokens=3))
    request = ChatRequest(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Capital of France?"},
        ],
        max_tokens=16,
        temperature=0.0,
        top_p=0.5,
        logprobs=True,
        top_logprobs=3,
    )
    completion = await provider.complete(request)

    sent = server.sent[0]
    assert completion.text == "Paris is the capital."
    assert completion.model == "gpt-4o-mini"
    assert completion.finish_reason == "stop"
    expected = tuple(
        TokenLogprob(e.token, e.logprob, tuple((t.token, t.logprob) for t in e.top_logprobs))
        for e in sent.choices[0].logprobs.content
    )
    assert completion.logprobs == expected
    assert len(expected) == 4 and all(len(t.top) == 3 for t in expected)
    assert completion.usage == Usage(sent.usage.prompt_tokens, sent.usage.completion_tokens, cached_tokens=3)
    # The token window is the more depleted one (40% left against 99.8%), so its reset is the one given.
    assert completion.rate_limits == RateLimitInfo(500, 499, 30000, 12000, reset_seconds=360.0)

    received = server.received[0]
    assert received.headers["Authorization"] == f"Bearer {server.api_key}"
    assert received.body == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "max_tokens": 16,
        "temperature": 0.0,
        "top_p": 0.5,
        "logprobs": True,
        "top_logprobs": 3,
    }


async def test_plain_request_sends_no_sampling_or_logprob_fields(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    completion = await provider.complete(QUESTION)
    assert completion.logprobs is None
    assert completion.rate_limits is None
    assert set(server.received[0].body) == {"model", "messages", "max_tokens"}


async def test_top_logprobs_alone_turns_logprobs_on(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    completion = await provider.complete(ChatRequest(model="m", messages="hi", top_logprobs=2))
    assert server.received[0].body["logprobs"] is True
    assert completion.logprobs is not None and all(len(t.top) == 2 for t in completion.logprobs)


async def test_extra_fields_are_merged_and_max_completion_tokens_is_selectable(
    server: OpenAIWireServer,
) -> None:
    async with OpenAIProvider(
        base_url=server.base_url, api_key=server.api_key, max_tokens_field="max_completion_tokens"
    ) as provider:
        extra = {"seed": 7, "stop": ["\n"], "presence_penalty": 0.5, "user": "evomerge-test"}
        await provider.complete(ChatRequest(model="o4-mini", messages="hi", max_tokens=9, extra=extra))
    body = server.received[0].body
    assert body["max_completion_tokens"] == 9 and "max_tokens" not in body
    assert {k: body[k] for k in extra} == extra


async def test_null_content_and_missing_usage_are_accepted(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    def strip(data: dict[str, Any]) -> None:
        data["choices"][0]["message"]["content"] = None
        del data["usage"]

    server.push(Answer(mutate=strip))
    completion = await provider.complete(QUESTION)
    assert completion.text == "" and completion.usage == Usage()
    assert not completion.usage_known  # a scheduler charges it at its worst case


# Error statuses --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure, kind",
    [
        (Failure(400, "invalid_request_error", "bad max_tokens"), InvalidRequest),
        (
            Failure(401, "invalid_request_error", "Incorrect API key", code="invalid_api_key"),
            AuthenticationError,
        ),
        (Failure(403, "permission_error", "not allowed in your region"), AuthenticationError),
        (
            Failure(404, "invalid_request_error", "model gpt-9 does not exist", code="model_not_found"),
            InvalidRequest,
        ),
        (Failure(408, "timeout", "request timed out"), RequestTimeout),
        (Failure(409, "conflict", "request conflicts"), InvalidRequest),
        (Failure(413, "invalid_request_error", "request too large"), InvalidRequest),
        (Failure(422, "invalid_request_error", "unprocessable"), InvalidRequest),
        (Failure(429, "requests", "Rate limit reached", code="rate_limit_exceeded"), RateLimited),
        (
            Failure(429, "insufficient_quota", "You exceeded your current quota", code="insufficient_quota"),
            InvalidRequest,
        ),
        (Failure(500, "server_error", "The server had an error"), ServerError),
        (Failure(502, "server_error", "bad gateway"), ServerError),
        (Failure(503, "server_error", "The engine is currently overloaded"), ServerError),
    ],
)
async def test_every_error_status_maps_onto_the_sdk_errors(
    server: OpenAIWireServer, provider: OpenAIProvider, failure: Failure, kind: type[Exception]
) -> None:
    server.push(failure)
    with pytest.raises(kind) as caught:
        await provider.complete(QUESTION)
    err = caught.value
    assert type(err) is kind
    assert getattr(err, "status", None) == failure.status
    assert failure.message in str(err)
    # Only what may pass by waiting is retryable: quota, auth and bad requests are final.
    assert isinstance(err, RetryableError) == (kind in (RateLimited, ServerError, RequestTimeout))


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after-ms": "1500", "retry-after": "7"}, 1.5),
        ({}, None),
        ({"retry-after": "soon"}, None),
    ],
)
async def test_retry_after_is_honoured(
    server: OpenAIWireServer, provider: OpenAIProvider, headers: dict[str, str], expected: float | None
) -> None:
    server.push(Failure(429, "requests", "Rate limit reached", headers=headers))
    with pytest.raises(RateLimited) as caught:
        await provider.complete(QUESTION)
    assert caught.value.retry_after == expected


async def test_retry_after_as_http_date(server: OpenAIWireServer, provider: OpenAIProvider) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    server.push(Failure(429, "requests", "Rate limit reached", headers={"Retry-After": when}))
    with pytest.raises(RateLimited) as caught:
        await provider.complete(QUESTION)
    assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 120


async def test_rate_limited_error_carries_the_rate_limit_headers(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    server.push(
        Failure(
            429,
            "tokens",
            "Rate limit reached for tokens",
            headers={
                "x-ratelimit-limit-tokens": "1000",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "1.5s",
            },
        )
    )
    with pytest.raises(RateLimited) as caught:
        await provider.complete(QUESTION)
    assert caught.value.rate_limits == RateLimitInfo(tokens_limit=1000, tokens_remaining=0, reset_seconds=1.5)  # type: ignore[attr-defined]


async def test_429_the_server_says_not_to_retry_is_final(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    server.push(Failure(429, "requests", "billing hard limit", headers={"x-should-retry": "false"}))
    with pytest.raises(InvalidRequest, match="not retried"):
        await provider.complete(QUESTION)


async def test_html_error_page_from_a_proxy_still_maps_by_status(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    server.push(Raw(502, b"<html><body>502 Bad Gateway</body></html>", content_type="text/html"))
    with pytest.raises(ServerError, match="502 Bad Gateway"):
        await provider.complete(QUESTION)


# Transport faults and malformed answers ------------------------------------------------------------------


@pytest.mark.parametrize("fault", [Drop(), Truncate()])
async def test_dropped_connections_are_connection_failures(
    server: OpenAIWireServer, provider: OpenAIProvider, fault: Drop | Truncate
) -> None:
    server.push(fault)
    with pytest.raises(ConnectionFailed):
        await provider.complete(QUESTION)
    assert (await provider.complete(QUESTION)).text  # the next request on a fresh connection works


async def test_slow_answer_is_a_timeout(server: OpenAIWireServer) -> None:
    server.push(Hang())
    async with OpenAIProvider(base_url=server.base_url, api_key=server.api_key, timeout=0.2) as provider:
        with pytest.raises(RequestTimeout, match=r"0\.2 s"):
            await provider.complete(QUESTION)


async def test_refused_connection_is_a_connection_failure() -> None:
    idle = OpenAIWireServer()
    await idle.start()
    await idle.stop()  # the port is free again: nothing listens there
    async with OpenAIProvider(base_url=idle.base_url) as provider:
        with pytest.raises(ConnectionFailed):
            await provider.complete(QUESTION)


@pytest.mark.parametrize(
    "reply, needle",
    [
        (Raw(200, b'{"id": "chatcmpl-1", "choices": ['), "not JSON"),
        (Raw(200, b"<html>maintenance</html>", content_type="text/html"), "not JSON"),
        (Raw(200, b'"a string"'), "not a JSON object"),
        (Answer(mutate=edit(("choices",), DELETE)), "answer.choices"),
        (Answer(mutate=edit(("choices",), [])), "empty"),
        (Answer(mutate=edit(("choices", 0, "message"), DELETE)), "message"),
        (Answer(mutate=edit(("choices", 0, "message", "content"), 42)), "content"),
        (Answer(mutate=edit(("usage", "prompt_tokens"), "12")), "prompt_tokens"),
        (Answer(mutate=edit(("usage", "completion_tokens"), True)), "completion_tokens"),
        (Answer(mutate=edit(("usage", "prompt_tokens_details", "cached_tokens"), 1.5)), "cached_tokens"),
        (
            Answer(mutate=edit(("choices", 0, "logprobs", "content", 1, "logprob"), math.nan)),
            "logprob is nan",
        ),
        (
            Answer(mutate=edit(("choices", 0, "logprobs", "content", 0, "top_logprobs", 0, "token"), 5)),
            "token",
        ),
    ],
)
async def test_malformed_answers_are_bad_responses(
    server: OpenAIWireServer, provider: OpenAIProvider, reply: Answer | Raw, needle: str
) -> None:
    server.push(reply)
    with pytest.raises(BadResponse, match=needle):
        await provider.complete(ChatRequest(model="m", messages="hi there", logprobs=True, top_logprobs=2))


def test_minus_infinity_is_a_legitimate_logprob() -> None:
    from evomerge_openai.provider import _logprobs

    parsed = _logprobs({"content": [{"token": "a", "logprob": -math.inf, "top_logprobs": []}]})
    assert parsed == (TokenLogprob("a", -math.inf),)


# Configuration ------------------------------------------------------------------------------------------


async def test_configuration_from_the_environment(
    server: OpenAIWireServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.api_key is not None
    monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-wire")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj_wire")
    async with OpenAIProvider() as provider:
        await provider.complete(QUESTION)
    headers = server.received[0].headers
    assert headers["Authorization"] == f"Bearer {server.api_key}"
    assert headers["OpenAI-Organization"] == "org-wire" and headers["OpenAI-Project"] == "proj_wire"


async def test_arguments_win_over_the_environment(
    server: OpenAIWireServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    async with OpenAIProvider(base_url=server.base_url, api_key=server.api_key) as provider:
        assert (await provider.complete(QUESTION)).text


async def test_local_servers_need_no_key() -> None:
    async with (
        serve(OpenAIWireServer(api_key=None)) as local,
        OpenAIProvider(base_url=local.base_url) as provider,
    ):
        await provider.complete(QUESTION)
    assert "Authorization" not in local.received[0].headers


async def test_azure_deployments_form(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(OpenAIWireServer(azure_api_version="2024-10-21")) as azure:
        assert azure.api_key is not None
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", azure.api_key)
        monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", azure.base_url)
        monkeypatch.setenv("OPENAI_API_VERSION", "2024-10-21")
        async with OpenAIProvider(azure=True) as provider:
            completion = await provider.complete(
                ChatRequest(model="my-gpt4o deployment", messages="hi", logprobs=True)
            )
    received = azure.received[0]
    assert received.path == "/openai/deployments/my-gpt4o deployment/chat/completions"
    assert received.query == {"api-version": "2024-10-21"}
    assert received.headers["api-key"] == azure.api_key
    assert completion.logprobs is not None


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({}, "OPENAI_API_KEY"),
        ({"base_url": "localhost:8000/v1"}, "absolute http"),
        ({"base_url": "ftp://127.0.0.1/v1"}, "absolute http"),
        ({"base_url": "http://127.0.0.1:8000/v1", "timeout": 0}, "timeout"),
        ({"base_url": "http://127.0.0.1:8000/v1", "verify_tls": "no"}, "verify_tls"),
        ({"base_url": "http://127.0.0.1:8000/v1", "max_tokens_field": "max_new_tokens"}, "max_tokens_field"),
        ({"azure": True}, "AZURE_OPENAI_API_KEY"),
        ({"azure": True, "api_key": "k"}, "AZURE_OPENAI_ENDPOINT"),
        ({"azure": True, "api_key": "k", "base_url": "https://x.openai.azure.com"}, "OPENAI_API_VERSION"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        OpenAIProvider(**kwargs)


@pytest.mark.parametrize(
    "request_, needle",
    [
        (ChatRequest(model="m", messages="hi", extra={"seed": math.nan}), "non-finite"),
        (ChatRequest(model="m", messages="hi", extra={"logit_bias": {"1": math.inf}}), "non-finite"),
    ],
)
async def test_unsendable_requests_are_refused_before_sending(
    server: OpenAIWireServer, provider: OpenAIProvider, request_: ChatRequest, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        await provider.complete(request_)
    async with Scheduler(budget=Budget(tokens=10_000)) as scheduler:
        with pytest.raises(ConfigError, match=needle):
            await scheduler.complete(provider, request_)
        assert scheduler.spent().tokens == 0 and scheduler.spent().reserved_tokens == 0  # never sent
    assert server.received == []


# Secrets ------------------------------------------------------------------------------------------------


async def test_api_key_never_appears_in_errors_repr_or_logs(
    server: OpenAIWireServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-proj-SECRET-do-not-leak-4242"
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        # The server echoes the wrong key it got, as an unmasked 401 would.
        async with OpenAIProvider(base_url=server.base_url, api_key=secret) as provider:
            with pytest.raises(AuthenticationError) as auth:
                await provider.complete(QUESTION)
            server.api_key = None
            server.push(Raw(200, f'{{"echo": "{secret}"'.encode()))
            with pytest.raises(BadResponse) as bad:
                await provider.complete(QUESTION)
            shown = repr(provider)
    assert "Incorrect API key provided: ***" in str(auth.value)
    assert logs, "the adapter logged nothing, so the log check would be empty"
    for text in (
        str(auth.value),
        repr(auth.value),
        str(bad.value),
        repr(bad.value),
        shown,
        repr(logs),
        caplog.text,
    ):
        assert secret not in text


async def test_azure_key_never_appears_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "azure-SECRET-0000-do-not-leak"
    async with serve(OpenAIWireServer(azure_api_version="2024-10-21")) as azure:
        monkeypatch.setenv("OPENAI_API_VERSION", "2024-10-21")
        async with OpenAIProvider(azure=True, base_url=azure.base_url, api_key=secret) as provider:
            with pytest.raises(AuthenticationError) as caught:
                await provider.complete(QUESTION)
            assert secret not in repr(provider)
    assert secret not in str(caught.value)


# TLS, lifecycle, registry --------------------------------------------------------------------------------


async def test_tls_is_verified_unless_explicitly_disabled(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with serve(OpenAIWireServer(tls=server_tls)) as secure:
        assert secure.base_url.startswith("https://")
        async with OpenAIProvider(base_url=secure.base_url, api_key=secure.api_key) as strict:
            with pytest.raises(ConnectionFailed, match=r"(?i)certificate"):
                await strict.complete(QUESTION)
        async with OpenAIProvider(base_url=secure.base_url, api_key=secure.api_key, verify_tls=False) as lax:
            assert (await lax.complete(QUESTION)).text
        private_ca = ssl.create_default_context(cafile=str(cert))
        async with OpenAIProvider(
            base_url=secure.base_url, api_key=secure.api_key, verify_tls=private_ca
        ) as pinned:
            assert (await pinned.complete(QUESTION)).text


async def test_closed_provider_refuses_work_and_borrowed_sessions_stay_open(server: OpenAIWireServer) -> None:
    async with OpenAIProvider(base_url=server.base_url, api_key=server.api_key) as provider:
        await provider.complete(QUESTION)
    with pytest.raises(UsageError, match="closed"):
        await provider.complete(QUESTION)

    async with aiohttp.ClientSession() as session:
        borrowed = OpenAIProvider(base_url=server.base_url, api_key=server.api_key, session=session)
        await borrowed.complete(QUESTION)
        await borrowed.aclose()
        assert not session.closed


async def test_registered_under_the_providers_entry_point(server: OpenAIWireServer) -> None:
    assert available_providers()["openai"] is OpenAIProvider
    provider = load_provider("openai", base_url=server.base_url, api_key=server.api_key)
    try:
        assert isinstance(provider, OpenAIProvider) and isinstance(provider, Provider)
        assert provider.name == "openai" and provider.supports_logprobs
        assert (await provider.complete(QUESTION)).text
    finally:
        await provider.aclose()


# Header parsing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("59.876s", 59.876),
        ("2m", 120.0),
        ("17", 17.0),
        ("", None),
        ("soon", None),
        (None, None),
    ],
)
def test_parse_duration(value: str | None, seconds: float | None) -> None:
    result = parse_duration(value)
    assert result == pytest.approx(seconds) if seconds is not None else result is None


def test_rate_limits_absent_or_partial() -> None:
    assert parse_openai_rate_limits({}) is None
    # Azure sends remaining counts only.
    assert parse_openai_rate_limits(
        {"x-ratelimit-remaining-requests": "9", "x-ratelimit-remaining-tokens": "900"}
    ) == (RateLimitInfo(requests_remaining=9, tokens_remaining=900))


# The validating server itself ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda body: body.update(max_new_tokens=5), "max_new_tokens"),
        (lambda body: body.update(max_tokens="16"), "max_tokens"),
        (lambda body: body.update(logprobs="true"), "logprobs"),
        (lambda body: body.update(top_logprobs=2.5), "top_logprobs"),
        (lambda body: body["messages"][0].update(role="robot"), "role"),
        (lambda body: body["messages"][0].update(text="hi"), "text"),
        (lambda body: body.pop("model"), "model"),
    ],
)
async def test_the_server_rejects_requests_that_drift_from_the_api(
    server: OpenAIWireServer, change: Any, needle: str
) -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    change(body)
    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.base_url}/chat/completions", json=body, headers=headers) as resp,
    ):
        status, data = resp.status, await resp.json()
    assert status == 400 and data["error"]["type"] == "invalid_request_error"
    assert len(server.violations) == 1 and needle in server.violations[0]
    server.violations.clear()


async def test_an_adapter_that_drifts_fails_loudly(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        await provider.complete(ChatRequest(model="m", messages="hi", extra={"max_new_tokens": 5}))
    async with OpenAIProvider(base_url=server.origin, api_key=server.api_key) as no_v1:
        with pytest.raises(InvalidRequest, match="Invalid URL"):
            await no_v1.complete(QUESTION)
    assert len(server.violations) == 2
    server.violations.clear()
