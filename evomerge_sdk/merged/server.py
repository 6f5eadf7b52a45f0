"""A merged model as an OpenAI-compatible endpoint: `POST /v1/chat/completions`, `GET /v1/models`.

    async with MergedModelServer(merged, port=0) as server:     # 127.0.0.1 by default
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")

Answers have the shape of OpenAI's chat completions (`id`, `object`, `created`, `model`, `choices`,
`usage`); `usage` sums the tokens of every upstream query the merged answer needed (so it is what the
answer cost). `logprobs`/`top_logprobs` are honoured when the merged model has them (output mode: the
merged log-probabilities over the answer set). Not served: streaming, `n > 1`, tools.

Safety: loopback by default (another host needs `api_key`); with `api_key`, every `/v1/` request needs
`Authorization: Bearer <key>` (compared in constant time); bodies over `max_body_bytes` get 413. Errors
are JSON in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from aiohttp import web

from .._checks import is_int
from .._logs import get_logger
from ..errors import BudgetExceeded, ConfigError, EvomergeError, ProviderError
from ..http.server import AppServer, Refusal, is_loopback, until_terminated
from ..http.wire import chat_logprobs, chat_usage
from ..providers import Completion, Message, Role
from .model import MergedModel

__all__ = ["MergedModelServer", "serve_merged"]

_log = get_logger("evomerge_sdk.serve")


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise Refusal(400, "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise Refusal(400, f"messages[{i}] needs a role of system, developer, user or assistant")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) for p in content):
            parts = [p.get("text") for p in content if p.get("type") == "text"]
            if parts and all(isinstance(p, str) for p in parts):
                content = " ".join(str(p) for p in parts)
        if not isinstance(content, str):
            raise Refusal(400, f"messages[{i}].content must be a string or a list of text parts")
        role: Role = "user" if m["role"] == "user" else "assistant" if m["role"] == "assistant" else "system"
        out.append(Message(role, content))
    if not any(m.role == "user" for m in out):
        raise Refusal(400, "messages must include a user message")
    return tuple(out)


def _positive(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise Refusal(400, f"{name} must be a positive integer, got {value!r}")
    return value


class MergedModelServer(AppServer):
    """Serves one `MergedModel` on an OpenAI-compatible route (see the module doc); `async with` it."""

    _routes_hint = ": this server has GET /health, GET /v1/models and POST /v1/chat/completions"

    def __init__(
        self,
        model: MergedModel,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        max_body_bytes: int = 1 << 20,
        model_name: str | None = None,
    ) -> None:
        if not isinstance(model, MergedModel):
            raise ConfigError(f"model must be a MergedModel, got {type(model).__name__}")
        if model_name is not None and (not isinstance(model_name, str) or not model_name):
            raise ConfigError(f"model_name must be a non-empty string or None, got {model_name!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ConfigError("api_key must be a non-empty string or None")
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
        self._api_key = api_key.encode() if api_key else None
        self.requests = 0

    def __repr__(self) -> str:  # never the key
        auth = self._api_key is not None
        return f"MergedModelServer(url={self.url!r}, model={self.model_name!r}, auth={auth})"

    async def __aenter__(self) -> MergedModelServer:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._front])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        await self._serve(app)
        _log.info("merged_model_served", url=self.url, model=self.model_name)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.model_name, "mode": self.model.spec.mode})

    async def _models(self, request: web.Request) -> web.Response:
        entry = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "evomerge-sdk"}
        return web.json_response({"object": "list", "data": [entry]})

    async def _chat(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refusal(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise Refusal(400, "the body must be a JSON object")
        model = body.get("model")
        if model != self.model_name:
            raise Refusal(404, f"The model {model!r} does not exist: this server serves {self.model_name!r}",
                           "model_not_found")  # fmt: skip
        if body.get("stream"):
            raise Refusal(400, "stream=true is not supported: this server returns whole completions")
        if body.get("n", 1) != 1:
            raise Refusal(400, "n must be 1")
        messages = _messages(body.get("messages"))
        max_tokens = _positive(body, "max_completion_tokens") or _positive(body, "max_tokens") or 1
        logprobs = body.get("logprobs", False)
        if not isinstance(logprobs, bool):
            raise Refusal(400, "logprobs must be true or false")
        top = body.get("top_logprobs")
        if top is not None and (not is_int(top) or not 0 <= top <= 20):
            raise Refusal(400, "top_logprobs must be an integer in [0, 20]")
        if top and not logprobs:
            raise Refusal(400, "top_logprobs needs logprobs=true")
        try:
            completion = await self.model.complete(messages, max_tokens=max_tokens)
        except BudgetExceeded as exc:
            raise Refusal(429, f"the merged model's budget is spent: {exc}", "insufficient_quota") from None
        except ProviderError as exc:
            raise Refusal(502, f"an upstream model failed: {exc}", "upstream_error") from None
        except (ConfigError, EvomergeError) as exc:
            raise Refusal(400, str(exc)) from None
        self.requests += 1
        return web.json_response(self._answer(completion, logprobs, top or 0))

    def _answer(self, completion: Completion, logprobs: bool, top: int) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": completion.text, "refusal": None},
            "finish_reason": completion.finish_reason or "stop",
            "logprobs": None,
        }
        if logprobs and completion.logprobs:
            choice["logprobs"] = {
                "content": chat_logprobs((t.token, t.logprob, t.top[:top]) for t in completion.logprobs),
                "refusal": None,
            }
        u = completion.usage
        return {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "system_fingerprint": f"evomerge-{self.model.spec.mode}",
            "choices": [choice],
            "usage": chat_usage(u.input_tokens, u.output_tokens, u.cached_tokens),
        }


async def serve_merged(
    server: MergedModelServer, *, announce: Callable[[dict[str, Any]], None] | None = None
) -> None:
    """Run `server` until SIGINT/SIGTERM; `announce` receives {"url", "base_url", "model"} once it listens."""
    async with server:
        if announce is not None:
            announce({"url": server.url, "base_url": f"{server.url}/v1", "model": server.model_name})
        await until_terminated()
