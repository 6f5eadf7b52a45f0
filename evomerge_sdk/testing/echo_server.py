"""A minimal OpenAI-compatible chat-completions server on 127.0.0.1, and a provider that talks to it.

For tests and benchmarks of the scheduler: `EchoServer` answers `POST /v1/chat/completions` with a
deterministic reply derived from the prompt ("echo: " + the last user message, cut to `max_tokens`),
honest `usage` counted with the same tiktoken encodings the SDK uses (or the byte estimate when they
are unavailable, consistently on both sides), optional deterministic logprobs, optional bearer-token
auth, and everything `evomerge_sdk.local.faults` offers (fault injection, RPM/TPM enforcement with 429s,
served-token accounting). `GET /stats` and `POST /stats/reset` expose the accounting to another process.

`EchoProvider` is a small OpenAI-wire client (aiohttp) mapping HTTP outcomes onto the SDK's errors; for
real APIs use the `evomerge-openai` adapter.

Run it standalone (prints one JSON line with its URL, serves until SIGTERM/SIGINT):

    python -m evomerge_sdk.testing.echo_server --rpm 3000 --faults '{"error_rate": 0.1}'
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import hashlib
import json
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from .._checks import is_int
from .._io import canonical_json
from ..errors import (
    BadResponse,
    ConfigError,
    ConnectionFailed,
    ProviderError,
    RequestTimeout,
)
from ..http import (
    AppServer,
    bearer_matches,
    check_base_url,
    error_for_status,
    is_loopback,
    parse_openai_rate_limits,
    until_terminated,
)
from ..http.wire import chat_logprobs, chat_usage
from ..local.faults import FaultConfig, FaultInjector, ServerLimits, ServerStats, record_served
from ..providers import ChatRequest, Completion, RateLimitInfo, TokenLogprob, Usage
from ..scheduler._tokens import TokenCounter

__all__ = [
    "EchoProvider",
    "EchoServer",
    "echo_answer",
]

# The parsed body of the request being handled (parsed once for TPM costing, reused by the handler).
_parsed: contextvars.ContextVar[tuple[web.Request, dict[str, Any] | None] | None] = contextvars.ContextVar(
    "echo_parsed", default=None
)


def _check_loopback(host: str) -> None:
    if not is_loopback(host):
        raise ConfigError(f"the echo server only listens on loopback addresses, not {host!r}")


def echo_answer(messages: list[dict[str, Any]]) -> str:
    """The reply to a chat: "echo: " + the last user message, non-ASCII replaced (so cuts are exact)."""
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    return "echo: " + str(last).encode("ascii", "replace").decode("ascii")


def _logprobs(tokens: list[str], top: int) -> dict[str, Any]:
    entries = []
    for i, tok in enumerate(tokens):
        h = hashlib.sha256(f"{i}|{tok}".encode()).digest()
        lp = -(h[0] / 255.0) * 2.0
        alts = [(tok, lp)] + [(f"alt{j}", lp - 1.0 - j) for j in range(max(0, top - 1))]
        entries.append((tok, lp, alts[:top]))
    return {"content": chat_logprobs(entries)}


class EchoServer(AppServer):
    """The echo chat-completions server as an async context manager (127.0.0.1, port 0 by default)."""

    def __init__(
        self,
        *,
        faults: FaultConfig | None = None,
        limits: ServerLimits | None = None,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: TokenCounter | None = None,
    ) -> None:
        _check_loopback(host)
        self.host, self.port = host, port
        self._key = api_key
        self.tokens = tokens or TokenCounter()
        self.stats = ServerStats()
        self.injector = FaultInjector(faults, limits, stats=self.stats, token_cost=self._token_cost)
        self.app = web.Application(middlewares=[self.injector.middleware])
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/stats", self._stats)
        self.app.router.add_post("/stats/reset", self._reset)

    async def __aenter__(self) -> EchoServer:
        await self._serve(self.app)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()

    def provider(self, **kwargs: Any) -> EchoProvider:
        """An `EchoProvider` for this server (with its API key, if it has one); close it with `aclose`."""
        kwargs.setdefault("api_key", self._key)
        return EchoProvider(self.url, **kwargs)

    @property
    def open_connections(self) -> int:
        """Client connections currently open to this server."""
        server = self._runner.server if self._runner is not None else None
        return len(server.connections) if server is not None else 0

    async def _body(self, request: web.Request) -> dict[str, Any] | None:
        cached = _parsed.get()
        if cached is not None and cached[0] is request:
            return cached[1]
        try:
            parsed = json.loads(await request.read())
        except ValueError:
            parsed = None
        body = parsed if isinstance(parsed, dict) else None
        _parsed.set((request, body))
        return body

    def _parse(self, body: dict[str, Any] | None) -> ChatRequest:
        if body is None:
            raise ConfigError("the body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ConfigError("messages must be a list of {role, content} objects")
        seed = body.get("seed")
        if seed is not None and (not is_int(seed)):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        return ChatRequest(
            model=body.get("model", ""),
            messages=[{"role": m.get("role"), "content": m.get("content")} for m in messages],
            max_tokens=body.get("max_tokens", 256),
        )

    async def _token_cost(self, request: web.Request) -> int:
        try:
            req = self._parse(await self._body(request))
        except (ConfigError, TypeError, ValueError):
            return 0
        return await self.tokens.acount_request(req) + req.max_tokens

    async def _chat(self, request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "")
        if self._key is not None and not bearer_matches(given, self._key.encode()):
            return web.json_response(
                {
                    "error": {
                        "message": "Incorrect API key provided.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )
        body = await self._body(request)
        try:
            req = self._parse(body)
        except (ConfigError, TypeError, ValueError) as exc:
            return web.json_response(
                {
                    "error": {
                        "message": str(exc),
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=400,
            )
        assert body is not None
        prompt_tokens = await self.tokens.acount_request(req)
        text = echo_answer(body["messages"])
        enc = await self.tokens.aencoding(req.model)
        if enc is not None:
            ids = enc.encode_ordinary(text)
            cut = ids[: req.max_tokens]
            pieces = [enc.decode([i]) for i in cut] if body.get("logprobs") else []
            text, completion_tokens, truncated = enc.decode(cut), len(cut), len(ids) > len(cut)
        else:  # the byte estimate: one ASCII byte is one "token"
            truncated = len(text) > req.max_tokens
            text = text[: req.max_tokens]
            completion_tokens = len(text)
            pieces = list(text) if body.get("logprobs") else []
        record_served(request, prompt_tokens, completion_tokens)
        digest = hashlib.sha256(canonical_json(body).encode()).hexdigest()[:24]
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length" if truncated else "stop",
            "logprobs": _logprobs(pieces, int(body.get("top_logprobs") or 0))
            if body.get("logprobs")
            else None,
        }
        return web.json_response(
            {
                "id": f"chatcmpl-{digest}",
                "object": "chat.completion",
                "created": 0,
                "model": req.model,
                "choices": [choice],
                "usage": chat_usage(prompt_tokens, completion_tokens),
            }
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_dict())

    async def _reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return web.json_response({"status": "ok"})


# -- client side -------------------------------------------------------------------------------------


class EchoProvider:
    """A lean OpenAI-wire chat provider for the echo server (tests, benchmarks): plain aiohttp.

    Deliberately as thin as a hand-written aiohttp call, so benchmarks measure the scheduler and not
    the provider. No retries and no timeout of its own: those are the scheduler's. For real APIs use the
    `evomerge-openai` adapter.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        name: str = "echo",
        max_connections: int = 100,
        force_close: bool = False,
    ) -> None:
        self.name = name
        self._url = check_base_url(base_url, "base_url") + "/v1/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._limit = max_connections
        self._force_close = force_close
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never show the key
        return f"EchoProvider(url={self._url!r}, name={self.name!r})"

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP session (created on first use, inside the running loop)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limit, force_close=self._force_close)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None)
            )
        return self._session

    def body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body for `request`."""
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.logprobs:
            body["logprobs"] = True
            if request.top_logprobs is not None:
                body["top_logprobs"] = request.top_logprobs
        body.update(request.extra)
        return body

    async def complete(self, request: ChatRequest) -> Completion:
        """Send `request`; every failure arrives as one of the SDK's error types."""
        try:
            async with self.session.post(self._url, json=self.body(request), headers=self._headers) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except asyncio.TimeoutError:  # before ClientError: aiohttp's timeouts are both
            raise RequestTimeout(f"{self.name}: no answer") from None
        except aiohttp.ClientError as exc:
            raise ConnectionFailed(f"{self.name}: {type(exc).__name__}") from None
        limited = "x-ratelimit-limit-requests" in headers or "x-ratelimit-limit-tokens" in headers
        limits = parse_openai_rate_limits(headers) if limited else None
        if status != 200:
            raise _error(self.name, status, headers, raw, limits)
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            usage = data["usage"]
            text = choice["message"]["content"]
            return Completion(
                text=text if isinstance(text, str) else "",
                model=str(data.get("model", request.model)),
                finish_reason=choice.get("finish_reason"),
                logprobs=_parse_logprobs(choice.get("logprobs")),
                usage=Usage(
                    int(usage["prompt_tokens"]),
                    int(usage["completion_tokens"]),
                    int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
                ),
                rate_limits=limits,
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BadResponse(f"{self.name}: malformed answer ({type(exc).__name__})", status=200) from None

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def _error(
    name: str, status: int, headers: Mapping[str, str], raw: bytes, limits: RateLimitInfo | None
) -> ProviderError:
    """The SDK error for a non-200 answer (the server's message, never the request's headers)."""
    try:
        message = str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = raw[:200].decode("utf-8", "replace")
    err = error_for_status(status, f"{name} answered {status}: {message}", headers)
    err.rate_limits = limits
    return err


def _parse_logprobs(value: Any) -> tuple[TokenLogprob, ...] | None:
    if not value or value.get("content") is None:
        return None
    return tuple(
        TokenLogprob(
            str(item["token"]),
            float(item["logprob"]),
            tuple((str(alt["token"]), float(alt["logprob"])) for alt in item.get("top_logprobs") or ()),
        )
        for item in value["content"]
    )


# -- standalone --------------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    faults = FaultConfig(**json.loads(args.faults)) if args.faults else None
    limits = (
        ServerLimits(rpm=args.rpm, tpm=args.tpm, burst_seconds=args.burst) if args.rpm or args.tpm else None
    )
    async with EchoServer(faults=faults, limits=limits, port=args.port, api_key=args.api_key) as server:
        await server.tokens.aencoding(args.warm_model)  # load the encoding before the first request
        print(json.dumps({"url": server.url}), flush=True)
        await until_terminated()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rpm", type=float, default=None)
    parser.add_argument("--tpm", type=float, default=None)
    parser.add_argument("--burst", type=float, default=1.0, help="GCRA tolerance in seconds")
    parser.add_argument("--faults", default=None, help="FaultConfig fields as JSON")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--warm-model", default="gpt-4o-mini", help="load this model's encoding at start")
    args = parser.parse_args(argv)
    # stdout carries the one JSON line a parent process reads; logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
