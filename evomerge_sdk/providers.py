"""The provider interface every adapter implements, and the registry that finds adapters.

A provider is a thin translation between these value types and one wire format. It does no retries,
no rate limiting and no budgeting: that is the scheduler's job. It maps every failure onto the error
hierarchy in `evomerge_sdk.errors`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol, runtime_checkable

import attrs
from attrs.validators import optional

from ._checks import is_int, is_number
from ._io import canonical_json
from ._validators import must
from .errors import ConfigError

__all__ = [
    "ATTEMPT_TIMEOUT",
    "ENTRY_POINT_GROUP",
    "ChatRequest",
    "Completion",
    "Message",
    "Provider",
    "RateLimitInfo",
    "TokenLogprob",
    "Usage",
    "as_messages",
    "available_providers",
    "check_text",
    "load_provider",
]

ENTRY_POINT_GROUP = "evomerge_sdk.providers"

ATTEMPT_TIMEOUT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "evomerge_attempt_timeout", default=None
)
"""Seconds within which whoever awaits `Provider.complete` cancels it (the scheduler sets it around each
attempt it times). A provider whose own timeout is no tighter may then arm no timer of its own: one
timer per attempt instead of two is part of the overhead budget (benchmarks/scheduler.py)."""

Role = Literal["system", "user", "assistant"]
_ROLES = ("system", "user", "assistant")


def _check_role(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in _ROLES:
        raise ConfigError(f"message role must be one of {_ROLES}, got {value!r}")


def check_text(value: object, what: str) -> str:
    """`value` if it is a string that can be sent (UTF-8 encodable); ConfigError naming `what` otherwise."""
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what} is not valid text (a lone surrogate at {exc.start})") from None
    return value


def _check_content(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    check_text(value, "message content")


@attrs.frozen
class Message:
    """One chat message."""

    role: Role = attrs.field(validator=_check_role)
    content: str = attrs.field(validator=_check_content)


def as_messages(value: str | Sequence[Message] | Sequence[Mapping[str, str]]) -> tuple[Message, ...]:
    """A chat as `Message`s: a plain string is one user message; dicts need "role" and "content"."""
    if isinstance(value, str):
        return (Message("user", value),)
    if not isinstance(value, Sequence):
        raise ConfigError(f"messages must be a string or a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if isinstance(m, Message):
            out.append(m)
        elif isinstance(m, Mapping) and "role" in m and "content" in m:
            out.append(Message(m["role"], m["content"]))  # Message checks the role
        else:
            raise ConfigError(
                f"message {i} must be a Message or a mapping with role and content, got {m!r:.80}"
            )
    return tuple(out)


# Keys `extra` may not set: the typed fields own them, and the budget reserves for `max_tokens` output
# tokens of one streamed-whole answer, so a bigger cap, several choices or a stream would overspend it.
_RESERVED_EXTRA = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "max_output_tokens", "n", "stream"}
    | {"temperature", "top_p", "logprobs", "top_logprobs"}  # the typed fields
)


def _to_dict(value: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"extra must be a mapping, got {type(value).__name__}")
    return dict(value)


def _no_reserved_keys(_: object, __: attrs.Attribute[Any], extra: Mapping[str, Any]) -> None:
    """Refuse keys the typed fields own, or that would let one answer spend past its reservation."""
    reserved = sorted(k for k in extra if k in _RESERVED_EXTRA)
    if reserved:
        raise ConfigError(
            f"extra may not set {reserved}: use ChatRequest's own fields (the budget reserves for "
            "max_tokens output tokens of one answer)"
        )


@attrs.frozen
class ChatRequest:
    """A chat/completion request, independent of any provider's wire format.

    `extra` carries provider-specific fields verbatim (for example `seed` or `stop`); adapters merge it
    into the body they send. `messages` accepts a plain string as a single user message.
    """

    model: str = attrs.field(
        validator=must(
            lambda v: isinstance(v, str) and bool(v), "model must be a non-empty string, got {value!r}"
        )
    )
    messages: tuple[Message, ...] = attrs.field(
        converter=as_messages, validator=must(bool, "a request needs at least one message")
    )
    max_tokens: int = attrs.field(
        default=256,
        validator=must(
            lambda v: is_int(v) and v >= 1, "max_tokens must be a positive integer, got {value!r}"
        ),
    )
    temperature: float | None = attrs.field(
        default=None,
        validator=optional(
            must(
                lambda v: is_number(v) and v >= 0,
                "temperature must be a finite number >= 0 or None, got {value!r}",
            )
        ),
    )
    top_p: float | None = attrs.field(
        default=None,
        validator=optional(
            must(
                lambda v: is_number(v) and 0 < v <= 1,
                "top_p must be a number in (0, 1] or None, got {value!r}",
            )
        ),
    )
    logprobs: bool = attrs.field(
        default=False,
        validator=must(lambda v: isinstance(v, bool), "logprobs must be True or False, got {value!r}"),
    )
    top_logprobs: int | None = attrs.field(
        default=None,
        validator=optional(
            must(
                lambda v: is_int(v) and 0 <= v <= 20,
                "top_logprobs must be an integer in [0, 20] or None, got {value!r}",
            )
        ),
    )
    extra: Mapping[str, Any] = attrs.field(factory=dict, converter=_to_dict, validator=_no_reserved_keys)

    def canonical_json(self) -> str:
        """A stable serialisation: equal requests give equal strings (the cache key is its hash)."""
        return canonical_json(attrs.asdict(self, recurse=True))


@attrs.frozen
class Usage:
    """Tokens a request consumed, as the API reported them. `cached_tokens` is part of `input_tokens`."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_tokens + other.cached_tokens,
        )


@attrs.frozen
class TokenLogprob:
    """One generated token's log-probability, with the most likely alternatives when the API gave them."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@attrs.frozen
class RateLimitInfo:
    """What an API said about its current limits (from `x-ratelimit-*`-style headers); None = not said."""

    requests_limit: int | None = None
    requests_remaining: int | None = None
    tokens_limit: int | None = None
    tokens_remaining: int | None = None
    reset_seconds: float | None = None


@attrs.frozen
class Completion:
    """A provider's answer to a `ChatRequest`."""

    text: str
    model: str
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    usage: Usage = Usage()
    rate_limits: RateLimitInfo | None = None
    usage_known: bool = True
    """False when the API reported no usage (`usage` is then zeros): a scheduler charges such an answer
    its full reservation, and returns it with that reservation as its usage."""


@runtime_checkable
class Provider(Protocol):
    """What every adapter implements. `name` is its registry name (for example "openai")."""

    name: str

    async def complete(self, request: ChatRequest) -> Completion:
        """Send one request and return its completion, or raise a `ProviderError` subclass."""
        ...

    async def aclose(self) -> None:
        """Release connections; the provider is not used afterwards."""
        ...


def available_providers() -> dict[str, Callable[..., Provider]]:
    """Provider factories registered under the `evomerge_sdk.providers` entry-point group."""
    return {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_provider(name: str, **kwargs: Any) -> Provider:
    """Build the registered provider `name` with `kwargs`; a clear error if none is registered."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            factory: Callable[..., Provider] = ep.load()
            try:
                return factory(**kwargs)
            except TypeError as exc:  # an argument this provider does not take
                raise ConfigError(f"provider {name!r}: {exc}") from None
    known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    raise ConfigError(f"no provider named {name!r} is installed (installed: {known or 'none'})")
