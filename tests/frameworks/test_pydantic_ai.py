"""pydantic-ai (`Agent.run`, `run_stream`, a tool and a structured output refused clearly) against a real
`evomerge serve`, through its OpenAI chat model."""

from __future__ import annotations

import pydantic
import pytest
from framework_kit import Served
from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider


def _model(s: Served) -> OpenAIChatModel:
    return OpenAIChatModel(s.model, provider=OpenAIProvider(base_url=s.base_url, api_key=s.api_key))


@pytest.mark.anyio
async def test_agent_run(output_server: Served) -> None:
    agent = Agent(_model(output_server), instructions="Answer with one label.")
    result = await agent.run(output_server.prompt)
    assert result.output in output_server.spec.answer_set
    assert result.usage().total_tokens > 0


@pytest.mark.anyio
async def test_agent_run_stream(output_server: Served) -> None:
    agent = Agent(_model(output_server))
    async with agent.run_stream(output_server.prompt) as run:
        texts = [text async for text in run.stream_text()]
    assert texts and texts[-1] in output_server.spec.answer_set


@pytest.mark.anyio
async def test_an_agent_with_a_tool_is_refused_naming_tools(output_server: Served) -> None:
    agent = Agent(_model(output_server))

    @agent.tool_plain
    def lookup(word: str) -> str:
        """Look a word up."""
        raise AssertionError("the merged model cannot call tools")

    with pytest.raises(ModelHTTPError) as refused:
        await agent.run(output_server.prompt)
    assert refused.value.status_code == 400
    assert "tools" in str(refused.value.body)


class Label(pydantic.BaseModel):
    label: str


@pytest.mark.anyio
async def test_structured_output_is_refused_not_ignored(output_server: Served) -> None:
    # pydantic-ai asks for a structured output through a tool (its default) or response_format.
    with pytest.raises(ModelHTTPError) as refused:
        await Agent(_model(output_server), output_type=Label).run(output_server.prompt)
    assert refused.value.status_code == 400
