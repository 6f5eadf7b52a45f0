"""LiteLLM (`acompletion`, streaming, a tool refused) against a real `evomerge serve`, as an
OpenAI-compatible endpoint (`openai/<model>` with `api_base`)."""

from __future__ import annotations

import litellm
import pytest
from framework_kit import TOOL, Served


def _args(s: Served) -> dict[str, object]:
    return {
        "model": f"openai/{s.model}",
        "api_base": s.base_url,
        "api_key": s.api_key,
        "messages": [{"role": "user", "content": s.prompt}],
        "num_retries": 0,
    }


@pytest.mark.anyio
async def test_acompletion(output_server: Served) -> None:
    answer = await litellm.acompletion(**_args(output_server))
    assert answer.choices[0].message.content in output_server.spec.answer_set
    assert answer.usage.total_tokens > 0


@pytest.mark.anyio
async def test_streaming(output_server: Served) -> None:
    stream = await litellm.acompletion(**_args(output_server), stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text in output_server.spec.answer_set


@pytest.mark.anyio
async def test_a_tool_is_refused_naming_tools(output_server: Served) -> None:
    with pytest.raises(litellm.BadRequestError) as refused:
        await litellm.acompletion(**_args(output_server), tools=[TOOL])
    assert "tools" in str(refused.value)
