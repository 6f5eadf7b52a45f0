"""evomerge-anthropic: Anthropic's Messages API as an evomerge-sdk provider.

Registered under the `evomerge_sdk.providers` entry-point group as "anthropic", so
`evomerge_sdk.load_provider("anthropic")` finds it once this distribution is installed.
"""

from __future__ import annotations

from .provider import DEFAULT_API_VERSION, DEFAULT_BASE_URL, AnthropicProvider, parse_rate_limits

__all__ = ["DEFAULT_API_VERSION", "DEFAULT_BASE_URL", "AnthropicProvider", "parse_rate_limits"]
