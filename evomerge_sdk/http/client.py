"""The HTTP client every provider shares: session lifetime, failure mapping, rate-limit headers.

Adapters (and the merge-service client) build on `HTTPClient` so each provider module only translates its
own wire format; every status and transport failure maps onto `evomerge_sdk.errors` here, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp
import attrs
from yarl import URL

from .._checks import check_number, is_real
from .._logs import get_logger, register_secret
from ..errors import (
    AuthenticationError,
    BadResponse,
    ConfigError,
    ConnectionFailed,
    InvalidRequest,
    ProviderError,
    RateLimited,
    RequestTimeout,
    ServerError,
    UsageError,
)
from ..providers import ATTEMPT_TIMEOUT, RateLimitInfo
from ._gate import ByteGate
from .wire import NestingError, loads

log = get_logger(__name__)

# (limit, remaining, seconds until reset) of one rate-limit window, as the headers reported it.
Window = tuple[int | None, int | None, float | None]

_Owner = TypeVar("_Owner", bound="SessionOwner")

# Built once: json.dumps with options builds a new encoder per call (half of its cost for a chat body).
_ENCODER = json.JSONEncoder(allow_nan=False, ensure_ascii=False)
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None)

_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}

MAX_ANSWER_BYTES = 64 * 1024 * 1024
"""The default cap: answers longer than this are refused (`BadResponse`) instead of read into memory
whole. Each adapter sets its own, sized to its API (OpenAI 16 MiB: logprobs make long answers big;
Anthropic 4 MiB); this only stops a broken or hostile server."""

_FREE_BYTES = 64 * 1024
"""Answers up to this size (nearly all) are read without taking room in the byte gate."""


@attrs.frozen
class HTTPAnswer:
    """One HTTP answer, read whole."""

    status: int
    headers: Mapping[str, str]
    text: str
    data: Any = None
    """The parsed JSON of a successful answer (whose `text` is then not kept)."""


def check_headers(headers: Mapping[str, str] | None, what: str = "headers") -> dict[str, str]:
    """`headers` as a dict of printable strings (the values aiohttp can send); ConfigError otherwise."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ConfigError(f"{what} must be a mapping of names to values, got {type(headers).__name__}")
    for name, value in headers.items():
        if not all(isinstance(s, str) and s.isprintable() for s in (name, value)):
            raise ConfigError(f"{what}: {name!r} must name a string value without control characters")
    return dict(headers)


def check_base_url(url: str, what: str) -> str:
    """`url` without a trailing slash; a `ConfigError` unless it is an absolute http(s) URL."""
    if not isinstance(url, str):
        raise ConfigError(f"{what} must be a URL string, got {type(url).__name__}")
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"{what} must be an absolute http(s) URL, got {url!r}")
    return url.rstrip("/")


def _ssl_setting(verify_tls: bool | ssl.SSLContext) -> bool | ssl.SSLContext:
    if isinstance(verify_tls, (bool, ssl.SSLContext)):
        return verify_tls
    raise ConfigError(f"verify_tls must be True, False or an ssl.SSLContext, got {verify_tls!r}")


class HTTPClient:
    """Posts JSON through one aiohttp session and maps every transport failure onto the SDK's errors.

    The session is created on first use (inside the running loop) and closed by `aclose`, unless the
    caller passed their own, which stays theirs. `secrets` are scrubbed from every error text and log.
    """

    def __init__(
        self,
        *,
        provider: str,
        timeout: float,
        verify_tls: bool | ssl.SSLContext,
        session: aiohttp.ClientSession | None,
        secrets: Sequence[str],
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        max_buffered_bytes: int | None = None,
    ) -> None:
        if not is_real(timeout) or not timeout > 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.provider = provider
        self.timeout = float(timeout)
        self._ssl = _ssl_setting(verify_tls)
        self._session = session
        self._owned = session is None
        self._closed = False
        for secret in secrets:
            # Never echo the value: it is a credential.
            if secret is not None and not isinstance(secret, str):
                raise ConfigError(f"an API key must be a string, got {type(secret).__name__}")
            if secret and not secret.isprintable():
                raise ConfigError("an API key must be printable text (no line breaks or control characters)")
        self._secrets = tuple(s for s in secrets if s)
        for secret in self._secrets:
            register_secret(secret)  # every log line of the process masks it, whatever its shape
        check_number("max_answer_bytes", max_answer_bytes, integer=True)
        check_number("max_buffered_bytes", max_buffered_bytes, integer=True, allow_none=True)
        self.max_answer_bytes = max_answer_bytes
        self.max_buffered_bytes = 4 * max_answer_bytes if max_buffered_bytes is None else max_buffered_bytes
        if self.max_buffered_bytes < max_answer_bytes:
            raise ConfigError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must hold at least one answer "
                f"(max_answer_bytes, {max_answer_bytes})"
            )
        self._bytes: ByteGate | None = None
        self._client_timeout = aiohttp.ClientTimeout(total=self.timeout)  # one, not one per request

    def redact(self, text: str) -> str:
        """`text` with every secret replaced by '***'."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def exchange(
        self,
        url: str,
        body: Mapping[str, Any],
        headers: Mapping[str, str],
        params: Mapping[str, str],
        *,
        rate_limits: Callable[[Mapping[str, str]], RateLimitInfo | None],
        final_429: Callable[[Mapping[str, Any]], bool],
        timeout: float | None = None,
    ) -> tuple[Any, RateLimitInfo | None]:
        """POST `body` as JSON; the parsed answer and its rate limits, or the SDK error for the failure.

        `rate_limits` reads the API's rate-limit headers; `final_429` tells, from the error object, a 429
        that waiting cannot fix (a spend limit, an exhausted quota) from a rate limit. `timeout`
        replaces the client's for this request (math.inf: none), for the rare call that runs for hours.
        """
        if body.get("stream"):
            raise ConfigError("stream=True is not supported: a provider returns whole completions")
        try:
            data = _ENCODER.encode(body).encode()
        except UnicodeEncodeError as exc:
            raise ConfigError(f"the request holds text that is not valid Unicode: {exc}") from exc
        except ValueError as exc:
            raise ConfigError(f"the request holds a non-finite number: {exc}") from exc
        answer = await self._send(
            "POST", url, {**headers, **_JSON_HEADERS}, params=params, data=data, timeout=timeout
        )
        return self._answer(answer, rate_limits, final_429), rate_limits(answer.headers)

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        rate_limits: Callable[[Mapping[str, str]], RateLimitInfo | None],
    ) -> Any:
        """Send a body-less request (GET, DELETE); the parsed JSON answer, or the SDK error for it."""
        return self._answer(
            await self._send(method, url, {**headers, "Accept": "application/json"}),
            rate_limits,
            lambda error: False,
        )

    def _answer(
        self,
        answer: HTTPAnswer,
        rate_limits: Callable[[Mapping[str, str]], RateLimitInfo | None],
        final_429: Callable[[Mapping[str, Any]], bool],
    ) -> Any:
        if 200 <= answer.status < 300:
            return answer.data
        data = None
        if len(answer.text) <= _FREE_BYTES:  # error objects are small; a huge error body is read as text
            with contextlib.suppress(ValueError):
                data = loads(answer.text)
        # {"error": {"type", "message", ...}} (OpenAI, Anthropic, llama.cpp, Ollama), or bare (old vLLM).
        error = data.get("error", data) if isinstance(data, dict) else None
        error = error if isinstance(error, dict) else {}
        parts = [error.get("type"), error.get("message")]
        # Redacted before it is cut: a cut through a key would leave the part before it readable.
        message = ": ".join(p for p in parts if isinstance(p, str)) or self.redact(answer.text)[:200]
        never_retry = answer.status == 429 and final_429(error)
        limits = rate_limits(answer.headers)
        raise self._error(answer, message or "(empty body)", limits, never_retry=never_retry)

    async def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
        timeout: float | None = None,
    ) -> HTTPAnswer:
        limit = self.timeout if timeout is None else timeout
        if self._closed:
            raise UsageError(f"the {self.provider} provider is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        held = 0  # bytes of this answer held in the gate, from reading it until it is parsed
        try:
            # Under a scheduler whose own per-attempt timeout is at least as tight, one timer is enough.
            enclosing = ATTEMPT_TIMEOUT.get()
            spec = self._client_timeout
            if timeout is not None:  # this request's own limit
                spec = _NO_TIMEOUT if math.isinf(limit) else aiohttp.ClientTimeout(total=limit)
            if enclosing is not None and enclosing <= limit:
                spec = _NO_TIMEOUT
            async with self._session.request(
                method,
                url,
                data=data,
                headers=headers,
                params=params or None,
                timeout=spec,
                ssl=self._ssl,
                allow_redirects=False,
            ) as resp:
                status, resp_headers = resp.status, resp.headers
                raw, held = await self._read(resp)
                if 200 <= status < 300:
                    return HTTPAnswer(status, resp_headers, "", self._parse(raw, status))
                text = raw.decode("utf-8", errors="replace")  # an error's status matters more than its text
                return HTTPAnswer(status, resp_headers, text)
        except asyncio.TimeoutError as exc:
            # Checked first: aiohttp's timeout errors are also connection errors.
            raise self._transport_failure(
                RequestTimeout, f"no complete answer within {limit:g} s", exc
            ) from exc
        except aiohttp.ClientError as exc:
            raise self._transport_failure(ConnectionFailed, f"{type(exc).__name__}: {exc}", exc) from exc
        finally:
            if held:
                self._gate().release(held)

    async def read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole answer body; `BadResponse` once it passes `max_answer_bytes` (never buffered whole)."""
        raw, held = await self._read(resp)
        if held:
            self._gate().release(held)
        return raw

    async def _read(self, resp: aiohttp.ClientResponse) -> tuple[bytes, int]:
        """The body, and the bytes it holds in the gate (0 for a small one): the caller releases them."""
        limit = self.max_answer_bytes
        length = resp.content_length
        if length is not None:
            if length > limit:
                raise self._too_long(resp.status, limit)
            held = 0
            if length > _FREE_BYTES:
                await self._gate().acquire(length)
                held = length
            try:
                return await resp.read(), held  # aiohttp stops at Content-Length
            except BaseException:
                if held:
                    self._gate().release(held)
                raise
        chunks, size, held = [], 0, 0
        try:
            async for chunk in resp.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise self._too_long(resp.status, limit)
                if size > _FREE_BYTES and not held:  # unknown length: hold the worst case while reading
                    await self._gate().acquire(limit)
                    held = limit
                chunks.append(chunk)
        except BaseException:
            if held:
                self._gate().release(held)
            raise
        if held:
            self._gate().release(held - size)
            held = size
        return b"".join(chunks), held

    def _parse(self, raw: bytes, status: int) -> Any:
        """JSON of a successful answer, parsed on the loop. CPython's C JSON parser holds the GIL for the
        whole parse, so a worker thread would stall the loop just as long (measured: 0.63 s of 0.74).
        A worker process does not pay either: its result is unpickled on this side, which for a 15 MiB
        answer of logprobs (what makes answers big) stalls the loop as long as parsing it here (0.49-0.90
        s against 0.56-0.79 s) and doubles its latency; only a flat array of small ints gains. What
        bounds the stall is the per-provider cap (`max_answer_bytes`)."""
        try:
            return loads(raw)
        except UnicodeDecodeError as exc:
            raise BadResponse(f"{self.provider}: answer is not UTF-8 ({exc})", status=status) from exc
        except NestingError as exc:
            raise BadResponse(f"{self.provider}: answer is JSON {exc}", status=status) from None
        except ValueError as exc:
            excerpt = self.redact(raw[:400].decode("utf-8", errors="replace"))[:120]
            raise BadResponse(f"{self.provider}: answer is not JSON: {excerpt!r}", status=status) from exc

    def _gate(self) -> ByteGate:
        if self._bytes is None:
            self._bytes = ByteGate(self.max_buffered_bytes)
        return self._bytes

    @property
    def buffered_bytes_peak(self) -> int:
        """The most answer bytes this client held at once beyond the free allowance (see `ByteGate`)."""
        return self._bytes.peak if self._bytes is not None else 0

    def _too_long(self, status: int, limit: int) -> BadResponse:
        return BadResponse(f"{self.provider}: answer is longer than {limit} bytes; refused", status=status)

    def _transport_failure(self, kind: type[ProviderError], detail: str, exc: BaseException) -> ProviderError:
        log.debug("provider.transport_error", provider=self.provider, error=type(exc).__name__)
        return kind(self.redact(f"{self.provider}: {detail}"))

    def _error(
        self, answer: HTTPAnswer, message: str, rate_limits: RateLimitInfo | None, *, never_retry: bool
    ) -> ProviderError:
        status = answer.status
        text = self.redact(f"{self.provider} answered {status}: {message}")
        err = error_for_status(status, text, answer.headers, never_retry=never_retry)
        err.rate_limits = rate_limits
        log.debug("provider.error", provider=self.provider, status=status, error=type(err).__name__)
        return err

    async def aclose(self) -> None:
        """Close the session if this client created it; later posts raise a `ConfigError`."""
        self._closed = True
        if self._owned and self._session is not None:
            await self._session.close()
        self._session = None


def error_for_status(
    status: int, text: str, headers: Mapping[str, str], *, never_retry: bool = False
) -> ProviderError:
    """The SDK error for an HTTP error status: what the scheduler retries (429, 408, 5xx) and what it
    never does (401/403, other 4xx, a 429 that is a spend limit: `never_retry`, or the API's
    `x-should-retry: false`, which Anthropic and OpenAI send when a retry cannot succeed)."""
    never_retry = never_retry or headers.get("x-should-retry") == "false"
    if status == 429 and not never_retry:
        return RateLimited(text, retry_after=retry_after_seconds(headers))
    if status == 429:
        return InvalidRequest(f"{text} (a spend limit or quota: not retried)", status=status)
    if status in (401, 403):
        return AuthenticationError(text, status=status)
    if status == 408:
        return RequestTimeout(text, status=status)
    if status >= 500:
        return ServerError(text, status=status)
    if status >= 400:
        return InvalidRequest(text, status=status)
    return BadResponse(f"{text} (unexpected status)", status=status)


class SessionOwner:
    """An async context manager around an `HTTPClient`: `async with Provider(...) as p:` closes it."""

    _http: HTTPClient

    async def aclose(self) -> None:
        """Release connections; the provider is not used afterwards."""
        await self._http.aclose()

    @property
    def max_answer_bytes(self) -> int:
        """Answers longer than this are refused unread (`BadResponse`)."""
        return self._http.max_answer_bytes

    @property
    def buffered_bytes_peak(self) -> int:
        """The most bytes of big answers held at once so far (bounded by `max_buffered_bytes`)."""
        return self._http.buffered_bytes_peak

    async def __aenter__(self: _Owner) -> _Owner:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def retry_after_seconds(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The server's wait hint: `retry-after-ms`, else `Retry-After` as seconds or an HTTP-date."""
    millis = _non_negative(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _non_negative(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _non_negative(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def header_int(headers: Mapping[str, str], name: str) -> int | None:
    """An integer header, or None when absent or not an integer."""
    value = headers.get(name)
    if value is None:
        return None
    value = value.strip()
    # isascii: str.isdigit also accepts other scripts' digits, which int() would read
    return int(value) if value.isascii() and value.isdigit() else None


def tightest(windows: Sequence[Window]) -> Window | None:
    """The most depleted reported window (lowest remaining/limit; the later reset on ties)."""
    known = [w for w in windows if w != (None, None, None)]

    def depletion(w: Window) -> tuple[float, float]:
        limit, remaining, reset = w
        share = remaining / limit if limit and remaining is not None else 1.0
        return share, -(reset or 0.0)

    return min(known, key=depletion) if known else None


def rate_limit_info(requests: Window, tokens: Window) -> RateLimitInfo | None:
    """One `RateLimitInfo` from the request and token windows; reset is the tightest window's."""
    binding = tightest([requests, tokens])
    if binding is None:
        return None
    return RateLimitInfo(
        requests_limit=requests[0],
        requests_remaining=requests[1],
        tokens_limit=tokens[0],
        tokens_remaining=tokens[1],
        reset_seconds=binding[2],
    )


# "6m0s", "1h2m3.5s", "20ms", "0.5s": the Go-style durations of OpenAI's x-ratelimit-reset-* headers.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | None) -> float | None:
    """Seconds in an `x-ratelimit-reset-*` value ("6m0s", "20ms", or plain seconds); None if unreadable."""
    text = (text or "").strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _DURATION_UNIT[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None


def parse_openai_rate_limits(headers: Mapping[str, str]) -> RateLimitInfo | None:
    """OpenAI's `x-ratelimit-*` headers (also sent by vLLM, Azure and the SDK's own servers) as a
    `RateLimitInfo`; None when the server sent none."""
    if not any(name in headers for name in _OPENAI_LIMIT_HEADERS):
        return None  # the common case for local servers: six lookups, no parsing

    def window(unit: str) -> Window:
        return (
            header_int(headers, f"x-ratelimit-limit-{unit}"),
            header_int(headers, f"x-ratelimit-remaining-{unit}"),
            parse_duration(headers.get(f"x-ratelimit-reset-{unit}")),
        )

    return rate_limit_info(window("requests"), window("tokens"))


_OPENAI_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{kind}-{unit}"
    for kind in ("limit", "remaining", "reset")
    for unit in ("requests", "tokens")
)
