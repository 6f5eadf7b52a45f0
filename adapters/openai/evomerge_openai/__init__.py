"""evomerge-openai: the OpenAI-compatible Chat Completions API as an evomerge-sdk provider.

Registered under the `evomerge_sdk.providers` entry-point group as "openai", so
`evomerge_sdk.load_provider("openai", base_url=...)` finds it once this distribution is installed.
"""

from __future__ import annotations

from .provider import DEFAULT_BASE_URL, OpenAIProvider

__all__ = ["DEFAULT_BASE_URL", "OpenAIProvider"]
