"""The OpenAI-compatible Chat Completions API as an evomerge provider.

One wire format served by OpenAI, Azure OpenAI, vLLM, llama.cpp, Ollama and the LiteLLM proxy. The
provider translates `ChatRequest` to `POST {base_url}/chat/completions` and the answer back to a
`Completion`; it never retries (the scheduler does) and maps every failure onto `evomerge_sdk.errors`.
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import quote

import aiohttp

from evomerge_sdk.errors import BadResponse, ConfigError
from evomerge_sdk.http import (
    HTTPClient,
    SessionOwner,
    check_base_url,
    check_headers,
    field,
    optional_field,
    parse_openai_rate_limits,
)
from evomerge_sdk.providers import ChatRequest, Completion, RateLimitInfo, TokenLogprob, Usage

__all__ = ["DEFAULT_BASE_URL", "MAX_ANSWER_BYTES", "OpenAIProvider"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_ANSWER_BYTES = 16 * 1024 * 1024
"""Default cap on one answer: a long completion with 20 top logprobs per token is a few MiB."""

# What a 429 that waiting cannot fix looks like: the account ran out of quota or credit.
_QUOTA_CODES = ("insufficient_quota", "billing_hard_limit_reached")


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _azure_setting(value: str | None, argument: str, variable: str) -> str:
    value = value or _env(variable)
    if not value:
        raise ConfigError(f"Azure OpenAI needs {argument}: pass it or set {variable}")
    return value


class OpenAIProvider(SessionOwner):
    """OpenAI-compatible Chat Completions (OpenAI, Azure OpenAI, vLLM, llama.cpp, Ollama, LiteLLM proxy).

    Arguments win over environment variables: `OPENAI_API_KEY`, `OPENAI_BASE_URL`, `OPENAI_ORG_ID`,
    `OPENAI_PROJECT_ID`; with `azure=True`, `AZURE_OPENAI_API_KEY`, `AZURE_OPENAI_ENDPOINT` and
    `OPENAI_API_VERSION`, and `ChatRequest.model` names the deployment. A key is optional except for
    api.openai.com and Azure, since local servers take none. `max_tokens_field` picks the body field for
    `ChatRequest.max_tokens` ("max_completion_tokens" for OpenAI reasoning models). TLS is verified
    unless `verify_tls=False`; an `ssl.SSLContext` trusts a private CA. A `session` passed in stays the
    caller's to close. Answers over `max_answer_bytes` are refused unread; big answers in flight hold at
    most `max_buffered_bytes` (default four answers' worth) between them.
    """

    name = "openai"
    supports_logprobs = True
    base_url: str

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        azure: bool = False,
        api_version: str | None = None,
        organization: str | None = None,
        project: str | None = None,
        max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
        timeout: float = 60.0,
        verify_tls: bool | ssl.SSLContext = True,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        max_buffered_bytes: int | None = None,
    ) -> None:
        if max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ConfigError(
                f"max_tokens_field must be 'max_tokens' or 'max_completion_tokens', got {max_tokens_field!r}"
            )
        self.azure = azure
        self.max_tokens_field = max_tokens_field
        self._headers = check_headers(headers)
        self._params: dict[str, str] = {}
        key = (
            self._configure_azure(api_key, base_url, api_version)
            if azure
            else self._configure_openai(api_key, base_url, organization, project)
        )
        self._http = HTTPClient(
            provider=self.name,
            timeout=timeout,
            verify_tls=verify_tls,
            session=session,
            secrets=[key or ""],
            max_answer_bytes=max_answer_bytes,
            max_buffered_bytes=max_buffered_bytes,
        )

    def _configure_azure(self, api_key: str | None, endpoint: str | None, api_version: str | None) -> str:
        key = _azure_setting(api_key, "api_key", "AZURE_OPENAI_API_KEY")
        endpoint = _azure_setting(endpoint, "base_url", "AZURE_OPENAI_ENDPOINT")
        self.base_url = check_base_url(endpoint, "the Azure OpenAI endpoint")
        self._headers["api-key"] = key
        self._params["api-version"] = _azure_setting(api_version, "api_version", "OPENAI_API_VERSION")
        return key

    def _configure_openai(
        self, api_key: str | None, base_url: str | None, organization: str | None, project: str | None
    ) -> str | None:
        key = api_key or _env("OPENAI_API_KEY")
        self.base_url = check_base_url(base_url or _env("OPENAI_BASE_URL") or DEFAULT_BASE_URL, "base_url")
        if key is None and self.base_url == DEFAULT_BASE_URL:
            raise ConfigError("api.openai.com needs an API key: pass api_key or set OPENAI_API_KEY")
        if key is not None:
            self._headers["Authorization"] = f"Bearer {key}"
        for header, value in (
            ("OpenAI-Organization", organization or _env("OPENAI_ORG_ID")),
            ("OpenAI-Project", project or _env("OPENAI_PROJECT_ID")),
        ):
            if value:
                self._headers.update(check_headers({header: value}, "organization and project"))
        return key

    def __repr__(self) -> str:
        return f"OpenAIProvider(base_url={self.base_url!r}, azure={self.azure})"

    def url_for(self, model: str) -> str:
        """Where a request for `model` goes (for Azure, `model` is the deployment name)."""
        if self.azure:
            return f"{self.base_url}/openai/deployments/{quote(model, safe='')}/chat/completions"
        return f"{self.base_url}/chat/completions"

    def body_for(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body for `request`; `request.extra` is merged last, so it can override a field."""
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            self.max_tokens_field: request.max_tokens,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        # top_logprobs is only valid with logprobs on, so asking for alternatives implies it.
        if request.logprobs or request.top_logprobs is not None:
            body["logprobs"] = True
        if request.top_logprobs is not None:
            body["top_logprobs"] = request.top_logprobs
        body.update(request.extra)
        return body

    async def complete(self, request: ChatRequest) -> Completion:
        """Send one chat completion request; raise the matching `ProviderError` on failure."""
        data, rate_limits = await self._http.exchange(
            self.url_for(request.model),
            self.body_for(request),
            self._headers,
            self._params,
            rate_limits=parse_openai_rate_limits,
            final_429=_out_of_quota,
        )
        return _completion(data, request, rate_limits)


def _out_of_quota(error: Mapping[str, Any]) -> bool:
    return error.get("code") in _QUOTA_CODES or error.get("type") in _QUOTA_CODES


def _completion(data: Any, request: ChatRequest, rate_limits: RateLimitInfo | None) -> Completion:
    fast = _plain_completion(data, request, rate_limits)
    if fast is not None:
        return fast
    choices = field(data, "choices", list, "answer")
    if not choices:
        raise BadResponse("answer.choices is empty")
    choice = choices[0]
    message = field(choice, "message", dict, "choices[0]")
    text = optional_field(message, "content", str, "choices[0].message")
    model = optional_field(data, "model", str, "answer")
    usage = _usage(data.get("usage"))
    return Completion(
        text=text or "",
        model=model or request.model,
        finish_reason=optional_field(choice, "finish_reason", str, "choices[0]"),
        logprobs=_logprobs(choice.get("logprobs")),
        usage=usage or Usage(),
        rate_limits=rate_limits,
        usage_known=usage is not None,
    )


def _plain_completion(
    data: Any, request: ChatRequest, rate_limits: RateLimitInfo | None
) -> Completion | None:
    """The common answer (text, no logprobs, plain usage) read with exact type checks only; None for
    anything else, which the checked path then reads (or refuses, naming the field).

    About a third of the checked path's cost: at thousands of answers a second it is part of what the
    adapter adds to raw aiohttp (benchmarks/scheduler.py, adapter_overhead_ratio).
    """
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
        usage = data["usage"]
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        model, finish = data.get("model"), choice.get("finish_reason")
        details = usage.get("prompt_tokens_details")
        cached = 0 if details is None else details.get("cached_tokens", 0)
    except (TypeError, KeyError, IndexError, AttributeError):
        return None
    if (
        type(text) is not str
        or type(prompt) is not int
        or type(completion) is not int
        or type(model) is not str
        or not (finish is None or type(finish) is str)
        or type(cached) is not int
        or choice.get("logprobs") is not None
    ):
        return None
    return Completion(
        text=text,
        model=model or request.model,
        finish_reason=finish,
        logprobs=None,
        usage=Usage(prompt, completion, cached),
        rate_limits=rate_limits,
    )


def _usage(usage: Any) -> Usage | None:
    # Some compatible servers omit usage (absent, null or {}): an unknown usage, which the scheduler
    # charges at the request's worst case rather than as free.
    if usage is None or usage == {}:
        return None
    details = optional_field(usage, "prompt_tokens_details", dict, "usage")
    cached = optional_field(details, "cached_tokens", int, "usage.prompt_tokens_details") if details else None
    return Usage(
        input_tokens=field(usage, "prompt_tokens", int, "usage"),
        output_tokens=field(usage, "completion_tokens", int, "usage"),
        cached_tokens=cached or 0,
    )


def _logprob(entry: Any, where: str) -> tuple[str, float]:
    token = field(entry, "token", str, where)
    value = field(entry, "logprob", float, where)
    # -inf is log(0) and legitimate; NaN or +inf would poison every score built on it.
    if math.isnan(value) or value == math.inf:
        raise BadResponse(f"{where}.logprob is {value}")
    return token, value


def _logprobs(logprobs: Any) -> tuple[TokenLogprob, ...] | None:
    if logprobs is None:
        return None
    content = optional_field(logprobs, "content", list, "choices[0].logprobs")
    if content is None:
        return None
    out = []
    for i, entry in enumerate(content):
        where = f"choices[0].logprobs.content[{i}]"
        token, value = _logprob(entry, where)
        tops = optional_field(entry, "top_logprobs", list, where) or []
        top = tuple(_logprob(t, f"{where}.top_logprobs[{j}]") for j, t in enumerate(tops))
        out.append(TokenLogprob(token=token, logprob=value, top=top))
    return tuple(out)
