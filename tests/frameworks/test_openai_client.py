"""The official `openai` client against a real `evomerge serve`: sync, async, streaming (the SSE wire
format checked chunk by chunk), the whole history reaching the backend, and what the merged model cannot
honour (tools, tool messages, response formats, n > 1) refused with a 400 naming the field."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pydantic
import pytest
from framework_kit import TOOL, Served


def _client(s: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.base_url, api_key=s.api_key, max_retries=0, timeout=60)


def test_sync_completion_has_an_option_of_the_answer_set_and_usage(output_server: Served) -> None:
    with _client(output_server) as client:
        answer = client.chat.completions.create(
            model=output_server.model, messages=[{"role": "user", "content": output_server.prompt}]
        )
    assert answer.choices[0].message.content in output_server.spec.answer_set
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.prompt_tokens > 0 and answer.usage.total_tokens > 0


@pytest.mark.anyio
async def test_async_completion_and_model_lookup(output_server: Served) -> None:
    s = output_server
    async with openai.AsyncOpenAI(base_url=s.base_url, api_key=s.api_key, max_retries=0) as client:
        answer = await client.chat.completions.create(
            model=s.model, messages=[{"role": "user", "content": s.prompt}], max_completion_tokens=16
        )
        model = await client.models.retrieve(s.model)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("gpt-4o")
    assert answer.choices[0].message.content in s.spec.answer_set
    assert model.id == s.model and model.object == "model"
    assert "gpt-4o" in str(missing.value)


def test_streaming_sends_role_content_finish_usage_and_done(output_server: Served) -> None:
    s = output_server
    with _client(s) as client:
        whole = client.chat.completions.create(
            model=s.model, messages=[{"role": "user", "content": s.prompt}]
        )
        chunks = list(
            client.chat.completions.create(
                model=s.model,
                messages=[{"role": "user", "content": s.prompt}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert {c.id for c in chunks} == {chunks[0].id} and all(
        c.object == "chat.completion.chunk" for c in chunks
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    *with_choices, last = chunks
    assert last.choices == [] and last.usage is not None and last.usage.total_tokens > 0
    assert all(c.usage is None for c in with_choices)
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content


def test_raw_stream_is_server_sent_events_ending_in_done(output_server: Served) -> None:
    s = output_server
    body = {"model": s.model, "messages": [{"role": "user", "content": s.prompt}], "stream": True}
    headers = {"Authorization": f"Bearer {s.api_key}"}
    with httpx.Client(timeout=60) as http:
        reply = http.post(f"{s.base_url}/chat/completions", json=body, headers=headers)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [e for e in reply.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert '"usage"' not in events[-2]  # no usage chunk unless stream_options.include_usage asks


@pytest.mark.anyio
async def test_async_streaming(output_server: Served) -> None:
    s = output_server
    async with openai.AsyncOpenAI(base_url=s.base_url, api_key=s.api_key, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=s.model, messages=[{"role": "user", "content": s.prompt}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text in s.spec.answer_set


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [TOOL]}, "tools"),
        ({"tools": [TOOL], "tool_choice": "required"}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 2}, "n"),
    ],
)
def test_what_the_merged_model_cannot_honour_is_a_400_naming_the_field(
    output_server: Served, extra: dict[str, Any], param: str
) -> None:
    s = output_server
    with _client(s) as client, pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=s.model, messages=[{"role": "user", "content": s.prompt}], **extra
        )
    assert refused.value.status_code == 400 and refused.value.param == param
    assert param in refused.value.message


def test_a_tool_call_in_the_history_is_refused_naming_the_message(output_server: Served) -> None:
    s = output_server
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"word": "x"}'}}
    history = [
        {"role": "user", "content": s.prompt},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a word"},
    ]
    with _client(s) as client, pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=s.model, messages=history)  # type: ignore[arg-type]
    assert refused.value.param == "messages[1].tool_calls"


class Label(pydantic.BaseModel):
    label: str


def test_structured_output_parse_is_refused_naming_response_format(output_server: Served) -> None:
    s = output_server
    with _client(s) as client, pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.parse(
            model=s.model, messages=[{"role": "user", "content": s.prompt}], response_format=Label
        )
    assert refused.value.param == "response_format"


def test_parameter_mode_gets_the_whole_history(parameter_server: Served) -> None:
    s = parameter_server
    history = [
        {"role": "system", "content": "Answer with one label."},
        {"role": "user", "content": s.prompt},
        {"role": "assistant", "content": "green"},
        {"role": "user", "content": s.prompt},
    ]
    with _client(s) as client:
        last_only = client.chat.completions.create(model=s.model, messages=history[-1:], temperature=0)
        whole = client.chat.completions.create(model=s.model, messages=history, temperature=0)  # type: ignore[arg-type]
    assert whole.usage is not None and last_only.usage is not None
    # The earlier turns reached the backend: the prompt it was charged for is longer.
    assert whole.usage.prompt_tokens > last_only.usage.prompt_tokens
    assert last_only.choices[0].message.content
