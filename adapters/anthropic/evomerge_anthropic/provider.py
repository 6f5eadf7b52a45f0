"""Anthropic's Messages API as an evomerge provider.

Translates `ChatRequest` to `POST {base_url}/v1/messages` and the answer back to a `Completion`. It never
retries (the scheduler does) and maps every failure onto `evomerge_sdk.errors`: 429 and 529 (overloaded)
are retryable, a 429 that reports a spend or credit limit is not.

The API gives no log-probabilities (`supports_logprobs = False`): a request asking for them is refused
with a `ConfigError`, and the output-space objective scores this provider from sampled answers instead.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import aiohttp

from evomerge_sdk.errors import ConfigError
from evomerge_sdk.http import (
    HTTPClient,
    SessionOwner,
    Window,
    check_base_url,
    check_headers,
    field,
    header_int,
    optional_field,
    rate_limit_info,
    tightest,
)
from evomerge_sdk.providers import ChatRequest, Completion, RateLimitInfo, Usage

__all__ = [
    "DEFAULT_API_VERSION",
    "DEFAULT_BASE_URL",
    "MAX_ANSWER_BYTES",
    "AnthropicProvider",
    "parse_rate_limits",
]

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_API_VERSION = "2023-06-01"
MAX_ANSWER_BYTES = 4 * 1024 * 1024
"""Default cap on one answer: Messages answers carry no logprobs, so even a long one is well under this."""

# Words of a 429 that waiting cannot fix (spend limit, credit, billing); the error type and the stable
# `details.error_code` say it first, the message is the fallback.
_SPEND_WORDS = ("spend limit", "spend_limit", "usage limit", "credit", "billing")


def _reset_seconds(value: str | None, now: float) -> float | None:
    """Seconds from `now` until an RFC 3339 reset time; None if absent or unreadable."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def parse_rate_limits(headers: Mapping[str, str], *, now: float | None = None) -> RateLimitInfo | None:
    """The `anthropic-ratelimit-*` headers as a `RateLimitInfo`; None when the server sent none.

    Tokens come from `-tokens-*` (Anthropic's most restrictive token limit), else from the more depleted
    of `-input-tokens-*` and `-output-tokens-*`. `now` (epoch seconds) defaults to the local clock.
    """
    now = time.time() if now is None else now

    def window(kind: str) -> Window:
        prefix = f"anthropic-ratelimit-{kind}-"
        return (
            header_int(headers, prefix + "limit"),
            header_int(headers, prefix + "remaining"),
            _reset_seconds(headers.get(prefix + "reset"), now),
        )

    tokens = window("tokens")
    if tokens == (None, None, None):
        tokens = tightest([window("input-tokens"), window("output-tokens")]) or tokens
    return rate_limit_info(window("requests"), tokens)


def _is_spend_limit(error: Mapping[str, Any]) -> bool:
    details = error.get("details")
    code = details.get("error_code") if isinstance(details, dict) else None
    message = error.get("message")
    text = " ".join(s for s in (error.get("type"), code, message) if isinstance(s, str)).lower()
    return any(word in text for word in _SPEND_WORDS)


class AnthropicProvider(SessionOwner):
    """Anthropic's Messages API (`x-api-key`, `anthropic-version`, system prompt, prompt-cache usage).

    Arguments win over the environment variables `ANTHROPIC_API_KEY` and `ANTHROPIC_BASE_URL`; a key is
    required. `version` is sent as `anthropic-version`. TLS is verified unless `verify_tls=False`; an
    `ssl.SSLContext` trusts a private CA. A `session` passed in stays the caller's to close. Answers over
    `max_answer_bytes` are refused unread; big answers in flight hold at most `max_buffered_bytes`.

    System messages become the top-level `system` prompt (joined by blank lines) and consecutive messages
    of one role are merged, as the API requires alternating turns. `temperature` and `top_p` are sent
    only when set: the newest models reject them (an `InvalidRequest`).

    Usage: `input_tokens` counts all billed input, that is the API's `input_tokens` (the uncached part)
    plus `cache_creation_input_tokens` plus `cache_read_input_tokens`; `cached_tokens` is the cache reads.
    Cache writes have no field of their own in `Usage`: they are in `input_tokens` only.
    """

    name = "anthropic"
    supports_logprobs = False
    base_url: str

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        version: str = DEFAULT_API_VERSION,
        timeout: float = 60.0,
        verify_tls: bool | ssl.SSLContext = True,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        max_buffered_bytes: int | None = None,
    ) -> None:
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            raise ConfigError("Anthropic needs an API key: pass api_key or set ANTHROPIC_API_KEY")
        if not isinstance(version, str) or not version:
            raise ConfigError(f"version must be an anthropic-version string like {DEFAULT_API_VERSION!r}")
        self.base_url = check_base_url(
            base_url or os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL, "base_url"
        )
        self.version = version
        self._headers = {**check_headers(headers), "x-api-key": key, "anthropic-version": version}
        self._http = HTTPClient(
            provider=self.name,
            timeout=timeout,
            verify_tls=verify_tls,
            session=session,
            secrets=[key],
            max_answer_bytes=max_answer_bytes,
            max_buffered_bytes=max_buffered_bytes,
        )

    def __repr__(self) -> str:
        return f"AnthropicProvider(base_url={self.base_url!r}, version={self.version!r})"

    def body_for(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body for `request`; `request.extra` (e.g. `stop_sequences`) is merged last."""
        if request.logprobs or request.top_logprobs is not None:
            raise ConfigError(
                "Anthropic's Messages API has no logprobs (AnthropicProvider.supports_logprobs is False): "
                "score this provider from sampled answers instead"
            )
        turns: list[dict[str, str]] = []
        for m in request.messages:
            if m.role == "system":
                continue
            if turns and turns[-1]["role"] == m.role:
                turns[-1]["content"] += "\n\n" + m.content
            else:
                turns.append({"role": m.role, "content": m.content})
        if not turns:
            raise ConfigError(
                "Anthropic needs at least one user or assistant message besides the system prompt"
            )
        body: dict[str, Any] = {"model": request.model, "max_tokens": request.max_tokens, "messages": turns}
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        if system:
            body["system"] = system
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        body.update(request.extra)
        return body

    async def complete(self, request: ChatRequest) -> Completion:
        """Send one Messages request; raise the matching `ProviderError` on failure."""
        data, rate_limits = await self._http.exchange(
            f"{self.base_url}/v1/messages",
            self.body_for(request),
            self._headers,
            {},
            rate_limits=parse_rate_limits,
            final_429=_is_spend_limit,
        )
        return _completion(data, request, rate_limits)


def _completion(data: Any, request: ChatRequest, rate_limits: RateLimitInfo | None) -> Completion:
    content = field(data, "content", list, "answer")
    # Only text blocks carry the answer; thinking or tool blocks are skipped.
    texts = [
        field(block, "text", str, f"content[{i}]")
        for i, block in enumerate(content)
        if field(block, "type", str, f"content[{i}]") == "text"
    ]
    usage = _usage(data)
    return Completion(
        text="".join(texts),
        model=optional_field(data, "model", str, "answer") or request.model,
        finish_reason=optional_field(data, "stop_reason", str, "answer"),
        logprobs=None,
        usage=usage or Usage(),
        rate_limits=rate_limits,
        usage_known=usage is not None,
    )


def _usage(data: dict[str, Any]) -> Usage | None:
    """The answer's usage; None when it reports none (absent, null or {}): the scheduler then charges the
    request's worst case rather than nothing."""
    usage = optional_field(data, "usage", dict, "answer")
    if not usage:
        return None
    written = optional_field(usage, "cache_creation_input_tokens", int, "usage") or 0
    read = optional_field(usage, "cache_read_input_tokens", int, "usage") or 0
    return Usage(
        input_tokens=field(usage, "input_tokens", int, "usage") + written + read,
        output_tokens=field(usage, "output_tokens", int, "usage"),
        cached_tokens=read,
    )
