"""Reading JSON off the wire: `loads` for whole bodies, and readers for fields of answers (a wrong or
missing field is a `BadResponse` naming its path).

Every adapter, the merge-service client and the SDK's servers parse bodies with `loads`, so JSON nested
too deeply to parse is the same plain `ValueError` everywhere (a 400 from a server, a `BadResponse` in a
client), never a `RecursionError` escaping as a 500 or a crash. The SDK's servers write the OpenAI
chat-completion pieces (`chat_logprobs`, `chat_usage`) one way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from ..errors import BadResponse

__all__ = ["NestingError", "chat_logprobs", "chat_usage", "field", "loads", "optional_field"]


class NestingError(ValueError):
    """JSON nested deeper than the parser can follow (about a thousand levels; real bodies use a few)."""


def loads(raw: bytes | str) -> Any:
    """`raw` (bytes must be UTF-8) parsed as JSON; `ValueError` for anything that is not, including
    `NestingError` for JSON nested too deeply and `UnicodeDecodeError` for bytes that are not UTF-8."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    try:
        return json.loads(text)
    except RecursionError:
        raise NestingError("the JSON is nested too deeply to parse") from None


_KindT = TypeVar("_KindT")


def optional_field(obj: Any, key: str, kind: type[_KindT], where: str) -> _KindT | None:
    """`obj[key]` checked to be a `kind` or null/absent; a `BadResponse` naming the path if not."""
    if not isinstance(obj, dict):
        raise BadResponse(f"{where} is not a JSON object")
    value = obj.get(key)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # type: ignore[return-value]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadResponse(f"{where}.{key} should be a {kind.__name__}, is a {type(value).__name__}")
    return value


def field(obj: Any, key: str, kind: type[_KindT], where: str) -> _KindT:
    """`obj[key]` checked to be a `kind`; a `BadResponse` naming the path if missing, null or mistyped."""
    value = optional_field(obj, key, kind, where)
    if value is None:
        raise BadResponse(f"{where}.{key} should be a {kind.__name__}, is missing or null")
    return value


def chat_logprobs(tokens: Iterable[tuple[str, float, Sequence[tuple[str, float]]]]) -> list[dict[str, Any]]:
    """`choices[0].logprobs.content` of an OpenAI chat completion: per generated token (token, logprob,
    its most likely alternatives), with the UTF-8 bytes OpenAI sends beside every token."""
    return [
        {
            "token": token,
            "logprob": logprob,
            "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top],
        }
        for token, logprob, top in tokens
    ]


def chat_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """The `usage` object of an OpenAI chat completion."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
