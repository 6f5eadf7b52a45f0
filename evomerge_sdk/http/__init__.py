"""HTTP plumbing: the client every provider shares (`client`), the server kit of the SDK's own servers
(`server`) and the readers for fields of JSON answers (`wire`).

Adapters import what they need from here; the three modules keep one job each.
"""

from __future__ import annotations

from .client import (
    MAX_ANSWER_BYTES,
    HTTPAnswer,
    HTTPClient,
    SessionOwner,
    Window,
    check_base_url,
    check_headers,
    error_for_status,
    header_int,
    parse_duration,
    parse_openai_rate_limits,
    rate_limit_info,
    retry_after_seconds,
    tightest,
)
from .server import AppServer, Handler, Refusal, bearer_matches, is_loopback, json_error, until_terminated
from .wire import chat_logprobs, chat_usage, field, optional_field

__all__ = [
    "MAX_ANSWER_BYTES",
    "AppServer",
    "HTTPAnswer",
    "HTTPClient",
    "Handler",
    "Refusal",
    "SessionOwner",
    "Window",
    "bearer_matches",
    "chat_logprobs",
    "chat_usage",
    "check_base_url",
    "check_headers",
    "error_for_status",
    "field",
    "header_int",
    "is_loopback",
    "json_error",
    "optional_field",
    "parse_duration",
    "parse_openai_rate_limits",
    "rate_limit_info",
    "retry_after_seconds",
    "tightest",
    "until_terminated",
]
