"""Loopback servers that speak the OpenAI and Anthropic wire formats, checked by the official SDKs' types.

Each is a real aiohttp server on 127.0.0.1. Every request body is validated by the official `openai` /
`anthropic` request TypedDicts (strict types, unknown fields rejected), and every answer is built from
the official response models and serialised from them, so the JSON an adapter parses has exactly the
real shape: a field name or shape that drifts from the real APIs fails a test. A request that breaks
the contract is answered 400 and recorded in `violations`, which the `serve` helper asserts empty.

Tests script what the next requests get with `push(...)`: an `Answer` (optionally mutated to inject
drift), a `Failure` in the API's own error shape, a `Raw` body, or a transport fault (`Drop`,
`Truncate`, `Hang`). Unscripted requests get a default `Answer`.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs
from aiohttp import web
from anthropic.types import Message, TextBlock
from anthropic.types import Usage as AnthropicUsage
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from anthropic.types.shared import (
    ContractSpendLimitReachedErrorDetails,
    EnforcedSpendLimitReachedErrorDetails,
    ErrorResponse,
)
from openai.types.chat import ChatCompletion, ChatCompletionMessage, ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
from openai.types.completion_usage import CompletionUsage, PromptTokensDetails
from openai.types.shared import ErrorObject
from pydantic import BaseModel, ConfigDict

__all__ = [
    "DELETE",
    "Answer",
    "AnthropicWireServer",
    "Drop",
    "Failure",
    "Hang",
    "OpenAIWireServer",
    "Raw",
    "Received",
    "Truncate",
    "edit",
    "make_self_signed",
    "serve",
]


@attrs.frozen
class Answer:
    """A successful answer, built from the official response model.

    `cached_tokens` are prompt-cache reads, `cache_write_tokens` Anthropic cache writes. `mutate` edits
    the serialised JSON before it is sent, to inject drift (a missing field, a wrong type, a NaN).
    """

    text: str = "Paris is the capital of France."
    finish_reason: str | None = None
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    headers: Mapping[str, str] = attrs.field(factory=dict)
    mutate: Callable[[dict[str, Any]], None] | None = None


DELETE = object()  # for `edit`: remove the field instead of setting it


def edit(path: tuple[str | int, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    """An `Answer.mutate` that sets (or, with `DELETE`, removes) the field at `path` of the answer JSON."""

    def mutate(data: dict[str, Any]) -> None:
        target: Any = data
        for key in path[:-1]:
            target = target[key]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


@attrs.frozen
class Failure:
    """An error answer in the API's own error shape; `code` is OpenAI's `error.code` or Anthropic's
    `error.details.error_code`."""

    status: int
    error_type: str
    message: str = "failure injected by the loopback server"
    code: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Raw:
    """A body sent verbatim (malformed JSON, HTML from a proxy, ...)."""

    status: int
    body: bytes
    content_type: str = "application/json"


@attrs.frozen
class Drop:
    """Close the connection without answering."""


@attrs.frozen
class Truncate:
    """Announce a long body, send a few bytes of it, then close the connection."""


@attrs.frozen
class Hang:
    """Never answer (until the server stops), so the client's timeout fires."""


Reply = Answer | Failure | Raw | Drop | Truncate | Hang


@attrs.frozen
class Received:
    """A request that passed validation: what the adapter put on the wire."""

    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: dict[str, Any]


class _Rejected(Exception):
    """The request breaks the API's contract (a violation) or its credentials are wrong (not one)."""

    def __init__(self, status: int, error_type: str, message: str, *, violation: bool = True) -> None:
        super().__init__(message)
        self.failure = Failure(status, error_type, message)
        self.violation = violation


def _strict_validator(params: type[Any]) -> Callable[[bytes], dict[str, Any]]:
    """A JSON validator for an official request TypedDict: strict types, unknown fields rejected."""

    class Envelope(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        body: params  # type: ignore[valid-type]

    def validate(raw: bytes) -> dict[str, Any]:
        # Parsed first: validating JSON directly lets pydantic read a string as an iterable of parts.
        envelope = Envelope.model_validate({"body": json.loads(raw, parse_constant=_no_constants)})
        return _materialise(envelope.body)  # type: ignore[no-any-return]

    return validate


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _materialise(value: Any) -> Any:
    # pydantic validates Iterable fields lazily; walking them is what runs (and fails) the validation.
    if isinstance(value, dict):
        return {k: _materialise(v) for k, v in value.items()}
    if isinstance(value, (str, bytes, int, float, type(None))):
        return value
    return [_materialise(v) for v in value]


class WireServer:
    """The shared machinery: lifecycle, scripting, transport faults. Subclasses define one API."""

    not_found_type = "not_found_error"  # the API's error type for a 404

    def __init__(
        self, *, api_key: str | None = "sk-wire-test-0123456789", tls: ssl.SSLContext | None = None
    ) -> None:
        self.api_key = api_key
        self.headers: dict[str, str] = {}  # sent with every answer, e.g. rate-limit headers
        self.received: list[Received] = []
        self.sent: list[Any] = []  # the official response models, in order
        self.violations: list[str] = []
        self._replies: deque[Reply] = deque()
        self._tls = tls
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def push(self, *replies: Reply) -> None:
        """Script the answers of the next requests, in order."""
        self._replies.extend(replies)

    @property
    def origin(self) -> str:
        """scheme://127.0.0.1:port"""
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._tls).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Release hanging handlers, then close."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # Subclass hooks -------------------------------------------------------------------------------

    def check(self, request: web.Request, raw: bytes) -> dict[str, Any]:
        """Validate method, path, headers and body; raise `_Rejected` when the request is wrong."""
        raise NotImplementedError

    def answer_body(self, answer: Answer, body: dict[str, Any]) -> dict[str, Any]:
        """The JSON of a successful answer, from the official response model (also kept in `sent`)."""
        raise NotImplementedError

    def failure_body(self, failure: Failure) -> dict[str, Any]:
        """The JSON of an error answer, from the official error model."""
        raise NotImplementedError

    # Machinery ------------------------------------------------------------------------------------

    def _body(self, validate: Callable[[bytes], dict[str, Any]], raw: bytes) -> dict[str, Any]:
        try:
            return validate(raw)
        except ValueError as exc:  # pydantic's ValidationError is one
            raise _Rejected(
                400, "invalid_request_error", f"request body does not match the API: {exc}"
            ) from exc

    def _check_transport(self, request: web.Request) -> None:
        if request.method != "POST":
            raise _Rejected(404, self.not_found_type, f"{request.method} {request.path} is not served")
        if request.content_type != "application/json":
            raise _Rejected(
                400, "invalid_request_error", f"Content-Type must be application/json: {request.content_type}"
            )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            self._check_transport(request)
            body = self.check(request, raw)
        except _Rejected as rejected:
            if rejected.violation:
                self.violations.append(str(rejected))
            return self._json(rejected.failure.status, self.failure_body(rejected.failure), {})
        self.received.append(Received(request.path, dict(request.query), dict(request.headers), body))
        reply = self._replies.popleft() if self._replies else Answer()
        if isinstance(reply, Answer):
            data = self.answer_body(reply, body)
            if reply.mutate is not None:
                reply.mutate(data)
            return self._json(200, data, reply.headers)
        if isinstance(reply, Failure):
            return self._json(reply.status, self.failure_body(reply), reply.headers)
        if isinstance(reply, Raw):
            return web.Response(
                status=reply.status, body=reply.body, content_type=reply.content_type, headers=self.headers
            )
        if isinstance(reply, Hang):
            await self._stopping.wait()
            return web.Response(status=503)
        if isinstance(reply, Truncate):
            resp = web.StreamResponse(
                status=200, headers={"Content-Type": "application/json", "Content-Length": "4096"}
            )
            await resp.prepare(request)
            await resp.write(b'{"id": "trunc')
        # Drop, or the rest of Truncate: hang up mid-exchange.
        assert request.transport is not None
        request.transport.close()
        return web.Response(status=200)

    def _json(self, status: int, data: dict[str, Any], headers: Mapping[str, str]) -> web.Response:
        # allow_nan: drift tests inject NaN on purpose; real servers must never send it.
        text = json.dumps(data, allow_nan=True)
        return web.Response(
            status=status, text=text, content_type="application/json", headers={**self.headers, **headers}
        )


def _words(text: str) -> list[str]:
    """The server's 'tokens': words with their leading whitespace."""
    return re.findall(r"\s*\S+", text)


class OpenAIWireServer(WireServer):
    """POST /v1/chat/completions (or Azure's deployments form) as OpenAI serves it.

    With `azure_api_version` set, it serves `/openai/deployments/{model}/chat/completions?api-version=...`
    and wants the `api-key` header instead of a bearer token. `api_key=None` is a local server (vLLM,
    llama.cpp, Ollama) that takes no key.
    """

    _validate = staticmethod(_strict_validator(CompletionCreateParamsNonStreaming))
    not_found_type = "invalid_request_error"

    def __init__(self, *, azure_api_version: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.azure_api_version = azure_api_version

    @property
    def base_url(self) -> str:
        """What the adapter's `base_url` should be (the Azure endpoint in Azure form)."""
        return self.origin if self.azure_api_version else f"{self.origin}/v1"

    def check(self, request: web.Request, raw: bytes) -> dict[str, Any]:
        body = self._body(self._validate, raw)
        if self.azure_api_version is None:
            if request.path != "/v1/chat/completions":
                raise _Rejected(404, "invalid_request_error", f"Invalid URL (POST {request.path})")
            sent_key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        else:
            if request.path != f"/openai/deployments/{body['model']}/chat/completions":
                raise _Rejected(404, "invalid_request_error", f"Resource not found: {request.path}")
            if request.query.get("api-version") != self.azure_api_version:
                raise _Rejected(
                    404,
                    "invalid_request_error",
                    f"unsupported api-version {request.query.get('api-version')}",
                )
            if "Authorization" in request.headers:
                raise _Rejected(
                    400, "invalid_request_error", "Azure API-key auth sends no Authorization header"
                )
            sent_key = request.headers.get("api-key", "")
        if self.api_key is not None and sent_key != self.api_key:
            raise _Rejected(
                401, "invalid_request_error", f"Incorrect API key provided: {sent_key}", violation=False
            )
        return body

    def answer_body(self, answer: Answer, body: dict[str, Any]) -> dict[str, Any]:
        tokens = _words(answer.text)
        logprobs = None
        if body.get("logprobs"):
            top_n = body.get("top_logprobs") or 0
            content = []
            for i, token in enumerate(tokens):
                value = -0.125 * (i + 1)
                alternatives = [token] + [f"{token}~{k}" for k in range(1, top_n)]
                top = [
                    TopLogprob(token=t, bytes=list(t.encode()), logprob=value - k)
                    for k, t in enumerate(alternatives)
                ]
                content.append(
                    ChatCompletionTokenLogprob(
                        token=token, bytes=list(token.encode()), logprob=value, top_logprobs=top
                    )
                )
            logprobs = ChoiceLogprobs(content=content, refusal=None)
        prompt_tokens = sum(len(str(m["content"]).split()) for m in body["messages"])
        # A real API never bills more output than the request allows (the scheduler refuses a report
        # that does); the scripted text stays whole, so tests can still compare it.
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or len(tokens)
        billed = min(len(tokens), limit)
        completion = ChatCompletion(
            id=f"chatcmpl-wire{len(self.sent)}",
            object="chat.completion",
            created=1_700_000_000,
            model=body["model"],
            system_fingerprint="fp_wire",
            choices=[
                Choice(
                    index=0,
                    finish_reason=answer.finish_reason or "stop",  # type: ignore[arg-type]
                    message=ChatCompletionMessage(role="assistant", content=answer.text, refusal=None),
                    logprobs=logprobs,
                )
            ],
            usage=CompletionUsage(
                prompt_tokens=prompt_tokens,
                completion_tokens=billed,
                total_tokens=prompt_tokens + billed,
                prompt_tokens_details=PromptTokensDetails(cached_tokens=answer.cached_tokens, audio_tokens=0),
            ),
        )
        self.sent.append(completion)
        return completion.model_dump(mode="json", exclude_unset=True)

    def failure_body(self, failure: Failure) -> dict[str, Any]:
        error = ErrorObject(message=failure.message, type=failure.error_type, param=None, code=failure.code)
        return {"error": error.model_dump(mode="json", exclude_unset=True)}


class AnthropicWireServer(WireServer):
    """POST /v1/messages as Anthropic serves it (`x-api-key`, `anthropic-version`).

    `temperature`, `top_p` and `top_k` are the only fields accepted beyond the official request type:
    the current SDK's types dropped them (the newest models reject them) but the API still takes them
    for older models, and the adapter sends them only when a request sets them.
    """

    versions = frozenset({"2023-06-01", "2023-01-01"})
    _validate = staticmethod(_strict_validator(MessageCreateParamsNonStreaming))
    _legacy_sampling: ClassVar[Mapping[str, tuple[float, float]]] = {
        "temperature": (0.0, 1.0),
        "top_p": (0.0, 1.0),
        "top_k": (1, 1_000_000),
    }
    _spend_details: ClassVar[Mapping[str, type[BaseModel]]] = {
        "enforced_spend_limit_reached": EnforcedSpendLimitReachedErrorDetails,
        "contract_spend_limit_reached": ContractSpendLimitReachedErrorDetails,
    }

    @property
    def base_url(self) -> str:
        """What the adapter's `base_url` should be."""
        return self.origin

    def check(self, request: web.Request, raw: bytes) -> dict[str, Any]:
        if request.path != "/v1/messages":
            raise _Rejected(404, "not_found_error", f"Not found: {request.path}")
        legacy: dict[str, Any] = {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise _Rejected(400, "invalid_request_error", f"body is not JSON: {exc}") from exc
        for name, (low, high) in self._legacy_sampling.items():
            if name in data:
                value = legacy[name] = data.pop(name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                    raise _Rejected(
                        400, "invalid_request_error", f"{name}: {value!r} is out of [{low}, {high}]"
                    )
        body = self._body(self._validate, json.dumps(data).encode())
        version = request.headers.get("anthropic-version")
        if version not in self.versions:
            raise _Rejected(
                400, "invalid_request_error", f"anthropic-version header: {version!r} is not valid"
            )
        if "Authorization" in request.headers:
            raise _Rejected(400, "invalid_request_error", "x-api-key auth sends no Authorization header")
        sent_key = request.headers.get("x-api-key", "")
        if sent_key != self.api_key:
            raise _Rejected(401, "authentication_error", f"invalid x-api-key: {sent_key}", violation=False)
        return {**body, **legacy}

    def answer_body(self, answer: Answer, body: dict[str, Any]) -> dict[str, Any]:
        tokens = _words(answer.text)
        prompt = " ".join([body.get("system", "")] + [str(m["content"]) for m in body["messages"]])
        message = Message(
            id=f"msg_wire{len(self.sent)}",
            type="message",
            role="assistant",
            model=body["model"],
            content=[TextBlock(type="text", text=answer.text, citations=None)],
            stop_reason=answer.finish_reason or "end_turn",  # type: ignore[arg-type]
            stop_sequence=None,
            usage=AnthropicUsage(
                input_tokens=len(prompt.split()),
                output_tokens=min(len(tokens), body["max_tokens"]),
                cache_creation_input_tokens=answer.cache_write_tokens,
                cache_read_input_tokens=answer.cached_tokens,
                service_tier="standard",
            ),
        )
        self.sent.append(message)
        return message.model_dump(mode="json", exclude_unset=True)

    def failure_body(self, failure: Failure) -> dict[str, Any]:
        response = ErrorResponse(
            type="error",
            error={"type": failure.error_type, "message": failure.message},  # type: ignore[arg-type]
            request_id="req_wire",
        )
        data = response.model_dump(mode="json", exclude_unset=True)
        if failure.code is not None:
            details = self._spend_details[failure.code](error_code=failure.code)  # type: ignore[arg-type]
            data["error"]["details"] = details.model_dump(mode="json")
        return data


_Server = TypeVar("_Server", bound=WireServer)


@asynccontextmanager
async def serve(server: _Server) -> AsyncIterator[_Server]:
    """Run `server` for the block; on a clean exit, assert the adapter never broke the wire contract."""
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
    assert server.violations == [], server.violations


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for 127.0.0.1 (via the openssl CLI), for TLS tests."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2"
    names = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [*command.split(), *names, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True
    )
    return cert, key
