"""The server kit of the SDK's own servers (the embedded service, the merged-model server, the test
doubles): starting a site, the loopback and bearer-token checks, body caps, refusals answered in one JSON
error shape, and the shutdown wait.

No input makes these servers answer 500 or echo a credential: a request aiohttp cannot even parse (a NUL
in a header) gets a JSON 400 that quotes nothing of it, and nothing of it is logged; an `Authorization`
header that is not printable ASCII is a 400 naming the header; with a key set, every route but `/health`
needs it; a key with surrounding whitespace is refused when the server is configured (`check_api_key`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .._logs import get_logger, register_secret
from ..errors import ConfigError

__all__ = [
    "AppServer",
    "Handler",
    "Refusal",
    "bearer_matches",
    "check_api_key",
    "is_loopback",
    "json_error",
    "until_terminated",
]


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (a loopback address, or 'localhost')."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


_log = get_logger(__name__)


def bearer_matches(authorization: str, key: bytes) -> bool:
    """Whether an `Authorization` header carries `Bearer <key>`, compared in constant time."""
    scheme, _, token = authorization.partition(" ")
    try:
        given = token.strip().encode("ascii")
    except UnicodeEncodeError:  # 0xff and friends: never a key of ours (check_api_key)
        return False
    return scheme.lower() == "bearer" and hmac.compare_digest(given, key)


def check_api_key(key: object, what: str = "api_key") -> bytes | None:
    """A server's bearer key as bytes (None: no auth); ConfigError, never echoing it, unless it is
    non-empty printable ASCII without surrounding whitespace (a client could never send it otherwise, and
    a stray newline from a file or an environment variable would lock everyone out)."""
    if key is None:
        return None
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{what} must be a non-empty string or None")
    if key != key.strip():
        raise ConfigError(f"{what} has surrounding whitespace (a line break from a file?); strip it")
    if not (key.isascii() and key.isprintable()):
        raise ConfigError(f"{what} must be printable ASCII (what an Authorization header can carry)")
    register_secret(key)
    return key.encode()


def _printable_ascii(value: str) -> bool:
    return value.isascii() and value.isprintable()


class Refusal(Exception):
    """A request one of the SDK's servers refuses: HTTP status, a message naming the problem, an error
    type (the OpenAI `error.type`), and headers such as `Retry-After`. `AppServer` answers it as JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = dict(headers or {})


def json_error(
    status: int, message: str, kind: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An error answer in the OpenAI shape every client of these servers reads: {"error": {...}}."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
    return web.json_response(body, status=status, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AppServer:
    """What the SDK's servers share: one aiohttp app served on `host`:`port` (0: a free port, known once
    started), stopped by `_stop`; bearer-token auth on /v1/ and every refusal answered as JSON (`_front`).

    A subclass sets `host`, `port`, `max_body_bytes` and `_api_key`, adds `_front` to its app's
    middlewares and calls `_serve` from `__aenter__`.
    """

    host: str
    port: int
    max_body_bytes: int
    _api_key: bytes | None = None
    _runner: web.AppRunner | None = None
    _routes_hint: str = ""
    """Appended to a 404's message: where a lost client can look."""

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:43127 (an OpenAI client's base_url is this plus /v1)."""
        return f"http://{self.host}:{self.port}"

    async def _serve(self, app: web.Application) -> None:
        # A port in use or a missing interface is the caller's setting, so it is a ConfigError saying so.
        # handler_cancellation: a client that gives up ends its (possibly hanging) handler too.
        runner = _Runner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _front(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authentication first (a refused client costs nothing further), then JSON for every refusal."""
        authorization = request.headers.get("Authorization", "")
        if not _printable_ascii(authorization):  # 0xff, a control character: refused, never echoed
            return json_error(
                400, "the Authorization header must be printable ASCII", "invalid_request_error"
            )
        # Only /health stays open, so a load balancer can probe without the key (/stats is not public).
        if (
            self._api_key is not None
            and request.path != "/health"
            and not bearer_matches(authorization, self._api_key)
        ):
            return json_error(
                401,
                "missing or invalid bearer token (send 'Authorization: Bearer <key>')",
                "authentication_error",
                {"WWW-Authenticate": "Bearer"},
            )
        return await self._respond(request, handler)

    async def _respond(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """`handler`'s answer, or its `Refusal` or aiohttp HTTP error as a JSON error answer."""
        try:
            return await handler(request)
        except Refusal as exc:
            return json_error(exc.status, exc.message, exc.kind, exc.headers)
        except web.HTTPException as exc:
            if exc.status == 413:
                message = f"the request body exceeds this server's limit of {self.max_body_bytes} bytes"
                return json_error(413, message, "request_too_large")
            where = f"{request.method} {request.path}"
            if exc.status == 404:
                return json_error(404, f"no route {where}{self._routes_hint}", "not_found_error")
            kind = "method_not_allowed" if exc.status == 405 else "http_error"
            return json_error(exc.status, f"{exc.reason or 'request refused'}: {where}", kind)


async def until_terminated() -> None:
    """Wait for SIGTERM or SIGINT (a server's run-until-stopped loop); handlers are removed afterwards."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if sys.platform != "win32" else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


class _JSONErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering what it cannot parse (or a crash) in the JSON error shape
    and without quoting the request: aiohttp's own 400 text repeats the offending header, key included."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The JSON error answer for a request that never reached a handler (or crashed in one)."""
        # The exception's text may hold the raw header: log its type only.
        _log.warning("http_request_refused", status=status, error=type(exc).__name__ if exc else None)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already being sent; the connection is closed")
        if status >= 500:  # the server's fault, so not an invalid request: a client may retry it
            text, kind = "the server failed on this request", "server_error"
        else:
            text = "the request is not valid HTTP (a header holds a byte HTTP does not allow)"
            kind = "invalid_request_error"
        body = {"error": {"message": text, "type": kind, "param": None, "code": None}}
        resp = web.json_response(body, status=status)
        resp.force_close()
        return resp


class _JSONErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JSONErrorHandler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    """An AppRunner whose connections use `_JSONErrorHandler`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JSONErrorServer  # same object, one overridden method: aiohttp builds it
        return server
