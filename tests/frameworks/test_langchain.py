"""LangChain's `ChatOpenAI` (invoke, stream, astream, bind_tools and with_structured_output refused
clearly) against a real `evomerge serve`."""

from __future__ import annotations

import openai
import pydantic
import pytest
from framework_kit import TOOL, Served
from langchain_openai import ChatOpenAI


def _chat(s: Served) -> ChatOpenAI:
    return ChatOpenAI(model=s.model, base_url=s.base_url, api_key=s.api_key, max_retries=0, timeout=60)


def test_invoke(output_server: Served) -> None:
    reply = _chat(output_server).invoke(
        [("system", "Answer with one label."), ("user", output_server.prompt)]
    )
    assert reply.content in output_server.spec.answer_set
    assert reply.usage_metadata is not None and reply.usage_metadata["total_tokens"] > 0


def test_stream(output_server: Served) -> None:
    text = "".join(str(chunk.content) for chunk in _chat(output_server).stream(output_server.prompt))
    assert text in output_server.spec.answer_set


@pytest.mark.anyio
async def test_astream(output_server: Served) -> None:
    text = "".join([str(chunk.content) async for chunk in _chat(output_server).astream(output_server.prompt)])
    assert text in output_server.spec.answer_set


def test_bind_tools_is_refused_naming_tools(output_server: Served) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(output_server).bind_tools([TOOL]).invoke(output_server.prompt)
    assert refused.value.param == "tools"


class Label(pydantic.BaseModel):
    label: str


def test_with_structured_output_is_refused_naming_the_field(output_server: Served) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(output_server).with_structured_output(Label).invoke(output_server.prompt)
    assert refused.value.param in ("response_format", "tools", "tool_choice")
