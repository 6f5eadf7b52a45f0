"""A merged model as an OpenAI-compatible endpoint: `POST /v1/chat/completions`, `GET /v1/models` and
`GET /v1/models/{id}`.

    async with MergedModelServer(merged, port=0) as server:     # 127.0.0.1 by default
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")

The endpoint speaks the chat-completions wire format agent frameworks send (the official openai client,
LiteLLM, pydantic-ai, LangChain):

* answers have OpenAI's shape (`id`, `object`, `created`, `model`, `choices`, `usage`); `usage` is always
  there and sums the tokens of every upstream query the answer needed (what it cost);
* `stream=true` answers as server-sent events: a role chunk, the content chunks, a finish chunk, the
  usage chunk when `stream_options.include_usage` asks for it, then `data: [DONE]`;
* the whole history (system, developer and every turn) reaches the model, which applies its own chat
  template; no `max_tokens` leaves the length to the model;
* what the model cannot honour is a 400 in OpenAI's error shape whose `param` names the field: `tools`,
  `functions`, `tool_choice`, `response_format` other than text, `n` > 1, non-text content, and
  tool-call or tool-result messages. A 200 never silently ignores a request;
* upstream failures are JSON too: 429 for a rate limit or a spent budget (`insufficient_quota`), 504 for
  an upstream that did not answer in time, 502 for anything else that failed upstream.

The served model is anything with a `name` and `async complete(messages, *, max_tokens=None) ->
Completion` (a `MergedModel` of either mode, or another backend); `logprobs`/`top_logprobs` are honoured
when its completion carries log-probabilities.

Safety: loopback by default (another host needs `api_key`); with `api_key`, every `/v1/` request needs
`Authorization: Bearer <key>` (compared in constant time); bodies over `max_body_bytes` get 413.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Protocol

import attrs
from aiohttp import web

from .._checks import is_int
from .._logs import get_logger
from ..errors import BudgetExceeded, ConfigError, EvomergeError, RateLimited, RequestTimeout
from ..http.server import AppServer, check_api_key, is_loopback, until_terminated
from ..http.wire import chat_logprobs, chat_usage, loads
from ..providers import Completion, Message, Role, TokenLogprob, Usage

__all__ = ["ChatModel", "MergedModelServer", "serve_merged"]

_log = get_logger("evomerge_sdk.merged.server")


class ChatModel(Protocol):
    """What the endpoint serves: a named model answering a chat (a `MergedModel` of either mode, or any
    backend with the same two members)."""

    @property
    def name(self) -> str:
        """The model name clients ask for."""
        ...

    def complete(
        self, messages: Sequence[Message], *, max_tokens: int | None = None
    ) -> Awaitable[Completion]:
        """The answer to the whole chat; `max_tokens` None leaves the length to the model."""
        ...


_KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class _Refused(Exception):
    """A request this server cannot honour: status, message, error type and the field it names."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "upstream_error")
        self.headers: dict[str, str] = {}

    def response(self) -> web.Response:
        """The refusal in OpenAI's error shape."""
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.kind}
        return web.json_response({"error": error}, status=self.status, headers=self.headers)


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (refusal parts count as text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            key = "refusal" if kind == "refusal" else "text"
            if kind not in ("text", "refusal") or not isinstance(part.get(key), str):
                raise _Refused(
                    400, f"{where}[{j}]: only text parts are supported, got type {kind!r}", f"{where}[{j}]"
                )
            texts.append(part[key])
        return "".join(texts)
    raise _Refused(400, f"{where} must be a string or a list of text parts", where)


def _messages(value: Any) -> tuple[Message, ...]:
    """The chat, every turn of it; tool traffic is refused naming the message, since no tool was offered."""
    if not isinstance(value, list) or not value:
        raise _Refused(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in _KNOWN_ROLES:
            raise _Refused(400, f"{where}.role must be system, developer, user or assistant", f"{where}.role")
        if role in ("tool", "function"):
            raise _Refused(400, f"{where} is a {role} result, but this model takes no tools", f"{where}.role")
        for field in ("tool_calls", "function_call"):
            if m.get(field):
                raise _Refused(
                    400,
                    f"{where}.{field}: this model cannot call tools, so it has no calls to continue",
                    f"{where}.{field}",
                )
        content = m.get("content")
        text = "" if content is None and role == "assistant" else _text(content, f"{where}.content")
        mapped: Role = "user" if role == "user" else "assistant" if role == "assistant" else "system"
        out.append(Message(mapped, text))
    if not any(m.role == "user" for m in out):
        raise _Refused(400, "messages must include a user message", "messages")
    return tuple(out)


def _refuse_what_cannot_be_honoured(body: dict[str, Any]) -> None:
    """A 400 naming the first field the merged model cannot honour (a 200 ignoring it would mislead)."""
    for field in ("tools", "functions"):
        if body.get(field):
            raise _Refused(
                400, f"{field}: this model cannot call tools; send the request without them", field
            )
    for field in ("tool_choice", "function_call"):
        if body.get(field) not in (None, "none"):
            raise _Refused(400, f"{field}: this model cannot call tools (only 'none' is accepted)", field)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise _Refused(
            400,
            f"response_format {kind!r}: this model only answers plain text (type 'text')",
            "response_format",
        )
    if body.get("n", 1) not in (1, None):
        raise _Refused(400, f"n must be 1: this model gives one answer per request, got {body['n']!r}", "n")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _Refused(400, "modalities: this model only answers text", "modalities")
    if body.get("audio") is not None:
        raise _Refused(400, "audio: this model only answers text", "audio")


def _positive(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise _Refused(400, f"{name} must be a positive integer, got {value!r:.40}", name)
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _Refused(400, f"{name} must be true or false, got {value!r:.40}", name)
    return value


@attrs.frozen
class _Asked:
    """What a chat-completions request asks for, checked."""

    messages: tuple[Message, ...]
    max_tokens: int | None
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool


def _parse(body: dict[str, Any]) -> _Asked:
    _refuse_what_cannot_be_honoured(body)
    messages = _messages(body.get("messages"))
    max_tokens = _positive(body, "max_completion_tokens") or _positive(body, "max_tokens")
    logprobs = _flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None and (not is_int(top) or not 0 <= top <= 20):
        raise _Refused(400, "top_logprobs must be an integer in [0, 20]", "top_logprobs")
    if top and not logprobs:
        raise _Refused(400, "top_logprobs needs logprobs=true", "top_logprobs")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise _Refused(400, "stream_options is only allowed with stream=true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise _Refused(400, "stream_options must be an object", "stream_options")
    include_usage = _flag(options or {}, "include_usage")
    return _Asked(messages, max_tokens, logprobs, top or 0, stream, include_usage)


def _upstream_failure(exc: BaseException) -> _Refused:
    """An upstream failure as the status a client's retry logic expects."""
    if isinstance(exc, BudgetExceeded):
        return _Refused(429, f"the merged model's budget is spent: {exc}", kind="insufficient_quota")
    if isinstance(exc, RateLimited):
        refused = _Refused(429, f"an upstream model is rate-limited: {exc}", kind="rate_limit_exceeded")
        if exc.retry_after is not None:
            refused.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return refused
    if isinstance(exc, RequestTimeout):
        return _Refused(504, f"an upstream model did not answer in time: {exc}", kind="upstream_timeout")
    if isinstance(exc, ConfigError):
        return _Refused(400, str(exc))
    return _Refused(502, f"an upstream model failed: {exc}", kind="upstream_error")


class MergedModelServer(AppServer):
    """Serves one merged model on an OpenAI-compatible route (see the module doc); `async with` it."""

    _routes_hint = (
        ": this server has GET /health, GET /v1/models, GET /v1/models/{id} and POST /v1/chat/completions"
    )

    def __init__(
        self,
        model: ChatModel,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        max_body_bytes: int = 1 << 20,
        model_name: str | None = None,
    ) -> None:
        if not callable(getattr(model, "complete", None)) or not isinstance(
            getattr(model, "name", None), str
        ):
            raise ConfigError(
                f"model must be a MergedModel (or have a name and async complete), got {type(model).__name__}"
            )
        if model_name is not None and (not isinstance(model_name, str) or not model_name):
            raise ConfigError(f"model_name must be a non-empty string or None, got {model_name!r}")
        key = check_api_key(api_key)  # masked in every log; a stray newline is refused, not locked out
        if not is_loopback(host) and api_key is None:
            raise ConfigError(f"listening on {host!r} (not loopback) needs an api_key")
        if not is_int(port) or not 0 <= port <= 65535:
            raise ConfigError(f"port must be an integer in [0, 65535], got {port!r}")
        if not is_int(max_body_bytes) or max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be an integer >= 1024, got {max_body_bytes!r}")
        self.model = model
        self.host, self.port = host, port
        self.model_name = model_name or model.name
        self.max_body_bytes = max_body_bytes
        self._api_key = key
        spec = getattr(model, "spec", None)
        self._kind = str(getattr(spec, "mode", "model"))
        self.requests = 0

    def __repr__(self) -> str:  # never the key
        auth = self._api_key is not None
        return f"MergedModelServer(url={self.url!r}, model={self.model_name!r}, auth={auth})"

    async def __aenter__(self) -> MergedModelServer:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._front])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model_id:.+}", self._model)
        app.router.add_post("/v1/chat/completions", self._chat)
        await self._serve(app)
        _log.info("merged_model_served", url=self.url, model=self.model_name)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.model_name, "mode": self._kind})

    def _entry(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "evomerge-sdk"}

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._entry()]})

    async def _model(self, request: web.Request) -> web.Response:
        asked = request.match_info["model_id"]
        if asked != self.model_name:
            error = _Refused(
                404,
                f"The model {asked!r} does not exist: this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )
            return error.response()
        return web.json_response(self._entry())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self._body(await request.read())
            asked = _parse(body)
            try:
                completion = await self.model.complete(asked.messages, max_tokens=asked.max_tokens)
            except EvomergeError as exc:
                raise _upstream_failure(exc) from None
        except _Refused as refused:
            return refused.response()
        self.requests += 1
        if asked.stream:
            return await self._stream(request, completion, asked)
        return web.json_response(self._answer(completion, asked))

    def _body(self, raw: bytes) -> dict[str, Any]:
        try:
            body = loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:  # NestingError too: nested JSON is a 400
            raise _Refused(400, f"the body is not valid JSON: {type(exc).__name__}") from None
        if not isinstance(body, dict):
            raise _Refused(400, "the body must be a JSON object")
        model = body.get("model")
        if model != self.model_name:
            raise _Refused(
                404,
                f"The model {model!r:.80} does not exist: this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )
        return body

    def _head(self, kind: str) -> dict[str, Any]:
        return {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "system_fingerprint": f"evomerge-{self._kind}",
        }

    def _answer(self, completion: Completion, asked: _Asked) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": completion.text, "refusal": None},
            "finish_reason": completion.finish_reason or "stop",
            "logprobs": None,
        }
        if asked.logprobs and completion.logprobs:
            choice["logprobs"] = {
                "content": _logprobs(completion.logprobs, asked.top_logprobs),
                "refusal": None,
            }
        return {**self._head("chat.completion"), "choices": [choice], "usage": _usage(completion.usage)}

    async def _stream(
        self, request: web.Request, completion: Completion, asked: _Asked
    ) -> web.StreamResponse:
        """The completion as OpenAI's server-sent events (the whole answer is known: errors came before)."""
        reply = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "Connection": "keep-alive",
            }
        )
        await reply.prepare(request)
        head = self._head("chat.completion.chunk")
        if asked.include_usage:
            head["usage"] = None  # every chunk carries the field; the last one fills it

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n"

        await reply.write(chunk({"role": "assistant", "content": ""}))
        tokens = completion.logprobs or ()
        if tokens and "".join(t.token for t in tokens) == completion.text:
            for t in tokens:  # one chunk per token, its log-probabilities beside it when asked
                lp = (
                    {"content": _logprobs((t,), asked.top_logprobs), "refusal": None}
                    if asked.logprobs
                    else None
                )
                await reply.write(chunk({"content": t.token}, logprobs=lp))
        elif completion.text:
            await reply.write(chunk({"content": completion.text}))
        await reply.write(chunk({}, completion.finish_reason or "stop"))
        if asked.include_usage:
            last = {**head, "choices": [], "usage": _usage(completion.usage)}
            await reply.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        await reply.write(b"data: [DONE]\n\n")
        await reply.write_eof()
        return reply


def _logprobs(tokens: Sequence[TokenLogprob], top: int) -> list[dict[str, Any]]:
    return chat_logprobs((t.token, t.logprob, t.top[:top]) for t in tokens)


def _usage(u: Usage) -> dict[str, Any]:
    return chat_usage(u.input_tokens, u.output_tokens, u.cached_tokens)


async def serve_merged(
    server: MergedModelServer, *, announce: Callable[[dict[str, Any]], None] | None = None
) -> None:
    """Run `server` until SIGINT/SIGTERM; `announce` receives {"url", "base_url", "model"} once it listens."""
    async with server:
        if announce is not None:
            announce({"url": server.url, "base_url": f"{server.url}/v1", "model": server.model_name})
        await until_terminated()
