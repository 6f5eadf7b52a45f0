"""The server kit of the SDK's own servers (the embedded service, the merged-model server, the test
doubles): starting a site, the loopback and bearer-token checks, body caps, refusals answered in one JSON
error shape, and the shutdown wait.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from ..errors import ConfigError

__all__ = [
    "AppServer",
    "Handler",
    "Refusal",
    "bearer_matches",
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


def bearer_matches(authorization: str, key: bytes) -> bool:
    """Whether an `Authorization` header carries `Bearer <key>`, compared in constant time."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key)


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
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
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
        # Health and other routes outside /v1/ stay open, so a load balancer can probe without the key.
        if (
            self._api_key is not None
            and request.path.startswith("/v1/")
            and not bearer_matches(request.headers.get("Authorization", ""), self._api_key)
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
