"""What the framework tests share besides fixtures: the running server's address and a tool to refuse."""

from __future__ import annotations

import attrs

from evomerge_sdk.merged import MergedSpec

API_KEY = "sk-frameworks-test"


@attrs.frozen
class Served:
    """One running `evomerge serve`: where it listens, the model name clients ask for, its spec, and a
    prompt of its task."""

    base_url: str
    model: str
    spec: MergedSpec
    prompt: str
    api_key: str = API_KEY


TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up.",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
    },
}
"""One function tool in OpenAI's shape, for the refusal tests."""
