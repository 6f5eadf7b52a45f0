"""Test doubles for code built on the SDK, in the spirit of pydantic-ai's `TestModel` and httpx's
`MockTransport`: real objects that speak the real interfaces, cheap and deterministic.

* `echo_server`: `EchoServer`, an OpenAI-compatible chat server on 127.0.0.1 that echoes the prompt
  (usage, logprobs, rate-limit headers, fault injection), and `EchoProvider`, a minimal provider for it;
  `python -m evomerge_sdk.testing.echo_server` runs one;
* `synthetic`: `SyntheticPool`, an engine objective on a synthetic pool with a known optimum;
* `objective`: `LocalObjective`, the engine's objective on the embedded repository in process (no HTTP),
  counting what a merge service would bill.

Nothing in the product imports this package; tests and benchmarks do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

_LAZY: dict[str, str] = {
    "EchoProvider": ".echo_server",
    "EchoServer": ".echo_server",
    "LocalObjective": ".objective",
    "ObjectiveUsage": ".objective",
    "SyntheticPool": ".synthetic",
}

if TYPE_CHECKING:
    from .echo_server import EchoProvider, EchoServer
    from .objective import LocalObjective, ObjectiveUsage
    from .synthetic import SyntheticPool

__all__ = ["EchoProvider", "EchoServer", "LocalObjective", "ObjectiveUsage", "SyntheticPool"]


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
