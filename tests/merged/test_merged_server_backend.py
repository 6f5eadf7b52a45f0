"""`MergedModelServer` serves any `ChatModel` (a name and `complete`), so other backends plug into the same
endpoint: what the server hands the backend (the whole history, `max_tokens` only when the client set
one) and how it streams a multi-token answer with its log-probabilities."""

from __future__ import annotations

import json
from collections.abc import Sequence

import aiohttp
import pytest

from evomerge_sdk.merged import ChatModel, MergedModelServer
from evomerge_sdk.providers import Completion, Message, TokenLogprob, Usage


class Recorder:
    """A backend that answers "Hello world" in two tokens and keeps what it was asked."""

    name = "recorder"

    def __init__(self) -> None:
        self.asked: list[tuple[tuple[Message, ...], int | None]] = []

    async def complete(self, messages: Sequence[Message], *, max_tokens: int | None = None) -> Completion:
        self.asked.append((tuple(messages), max_tokens))
        tokens = (TokenLogprob("Hello", -0.1, (("Hello", -0.1), ("Hi", -2.5))), TokenLogprob(" world", -0.2))
        return Completion("Hello world", self.name, "stop", tokens, Usage(7, 2))


async def _post(url: str, body: dict[str, object]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/chat/completions", json=body) as reply:
        return reply.status, await reply.text()


@pytest.mark.anyio
async def test_the_backend_gets_the_whole_history_and_no_length_unless_asked() -> None:
    backend = Recorder()
    model: ChatModel = backend
    history = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say hello"}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
    ]
    async with MergedModelServer(model) as server:
        status, _ = await _post(server.url, {"model": "recorder", "messages": history})
        assert status == 200
        status, _ = await _post(
            server.url, {"model": "recorder", "messages": history, "max_completion_tokens": 7}
        )
        assert status == 200
    (chat, length), (_, asked_length) = backend.asked
    assert [(m.role, m.content) for m in chat] == [
        ("system", "Be brief."),
        ("user", "Say hello"),
        ("assistant", "Hello"),
        ("user", "Again"),
    ]
    assert length is None and asked_length == 7


@pytest.mark.anyio
async def test_a_multi_token_answer_streams_token_by_token_with_logprobs() -> None:
    body = {
        "model": "recorder",
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "top_logprobs": 1,
    }
    async with MergedModelServer(Recorder()) as server:
        status, text = await _post(server.url, body)
    assert status == 200
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
        {"content": " world"},
        {},
    ]
    assert chunks[1]["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == [
        {"token": "Hello", "logprob": -0.1, "bytes": list(b"Hello")}
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 9
    assert all(c["usage"] is None for c in chunks[:-1])
