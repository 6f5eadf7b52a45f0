"""Loopback servers that misbehave on purpose, for the hostile-server guarantee suites.

`hostile(handler)` serves one aiohttp handler on 127.0.0.1 (a free port) for every path and method and
records what it was sent and what it served. Each test writes the misbehaviour it needs as a plain
aiohttp handler, so the client under test reads real bytes off a real socket. `raw_request` sends bytes
that aiohttp's client refuses to send (a NUL or 0xff in a header) straight to a socket.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ServerHandler = Callable[[web.Request, "Hostile"], Awaitable[web.StreamResponse]]


@attrs.define
class Hostile:
    """A running misbehaving server: its base URL and what it saw."""

    url: str
    bodies: list[Any] = attrs.field(factory=list)
    served_tokens: int = 0

    @property
    def requests(self) -> int:
        """Requests that reached the handler."""
        return len(self.bodies)


@asynccontextmanager
async def hostile(handler: ServerHandler) -> AsyncIterator[Hostile]:
    """Serve `handler(request, server)` for every route on 127.0.0.1 until the block ends."""
    state = Hostile(url="")

    async def route(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        state.bodies.append(json.loads(raw) if raw else None)
        return await handler(request, state)

    app = web.Application(client_max_size=1 << 26)
    app.router.add_route("*", "/{tail:.*}", route)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()


def openai_answer(body: dict[str, Any], usage: Any = ..., text: str = "Paris") -> dict[str, Any]:
    """A well-formed chat completion for `body`; `usage` replaces the usage object (omitted if ...)."""
    answer: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
    if usage is not ...:
        answer["usage"] = usage
    return answer


def anthropic_answer(body: dict[str, Any], usage: Any = ..., text: str = "Paris") -> dict[str, Any]:
    """A well-formed Messages answer for `body`; `usage` replaces the usage object (omitted if ...)."""
    answer: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
    }
    if usage is not ...:
        answer["usage"] = usage
    return answer


def honest_usage(body: dict[str, Any], server: Hostile) -> dict[str, int]:
    """Usage a server that bills fairly would report (and the tokens it counts as served)."""
    prompt = sum(len(m["content"].split()) for m in body["messages"]) + 2
    server.served_tokens += prompt + 1
    return {"prompt_tokens": prompt, "completion_tokens": 1, "total_tokens": prompt + 1}


async def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send `head` (request line and headers, without the blank line) and `body` over a plain socket.

    Returns the status, the headers (lower-case names) and the body of the answer.
    """
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        length = f"Content-Length: {len(body)}\r\nConnection: close\r\n".encode()
        writer.write(head.rstrip(b"\r\n") + b"\r\n" + length + b"\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest
