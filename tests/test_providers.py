from __future__ import annotations

import pytest

from evomerge_sdk import (
    ChatRequest,
    ConfigError,
    Message,
    RateLimited,
    RetryableError,
    Usage,
    available_providers,
    load_provider,
)


def test_string_prompt_becomes_one_user_message() -> None:
    req = ChatRequest(model="m", messages="hello")
    assert req.messages == (Message("user", "hello"),)


def test_dict_messages_are_converted() -> None:
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    req = ChatRequest(model="m", messages=msgs)
    assert [m.role for m in req.messages] == ["system", "user"]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"model": "", "messages": "x"}, "model"),
        ({"model": "m", "messages": []}, "at least one message"),
        ({"model": "m", "messages": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": "x", "top_logprobs": 21}, "top_logprobs"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"model": "m", "messages": "x", "max_tokens": None}, "max_tokens"),
        ({"model": "m", "messages": "x", "temperature": float("nan")}, "temperature"),
        ({"model": "m", "messages": "x", "top_p": 5}, "top_p"),
        ({"model": "m", "messages": "x", "logprobs": "yes"}, "logprobs"),
        ({"model": "m", "messages": "x", "top_logprobs": True}, "top_logprobs"),
        ({"model": "m", "messages": "\udcff bad"}, "lone surrogate"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "content must be a string"),
        ({"model": "m", "messages": 5}, "messages must be a string or a list"),
        ({"model": "m", "messages": "x", "extra": {"max_tokens": 5000}}, "extra may not set"),
        ({"model": "m", "messages": "x", "extra": {"stream": True, "n": 3}}, r"\['n', 'stream'\]"),
    ],
)
def test_bad_requests_fail_at_construction(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ChatRequest(**kwargs)  # type: ignore[arg-type]


def test_canonical_json_is_order_independent() -> None:
    a = ChatRequest(model="m", messages="x", extra={"b": 1, "a": 2})
    b = ChatRequest(model="m", messages="x", extra={"a": 2, "b": 1})
    assert a.canonical_json() == b.canonical_json()
    assert a.canonical_json() != ChatRequest(model="m", messages="y").canonical_json()


def test_usage_adds() -> None:
    assert Usage(1, 2, 0) + Usage(3, 4, 1) == Usage(4, 6, 1)
    assert Usage(4, 6, 1).total_tokens == 10


def test_rate_limited_is_retryable_and_carries_its_hint() -> None:
    err = RateLimited("slow down", retry_after=1.5)
    assert isinstance(err, RetryableError)
    assert err.retry_after == 1.5


def test_unknown_provider_names_the_installed_ones() -> None:
    assert isinstance(available_providers(), dict)
    with pytest.raises(ConfigError, match="no provider named 'nope'"):
        load_provider("nope")
