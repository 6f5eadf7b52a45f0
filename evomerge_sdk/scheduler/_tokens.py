"""Prompt token counting with tiktoken, and a conservative estimate when its files are unavailable.

tiktoken downloads its BPE rank files on first use and caches them under `TIKTOKEN_CACHE_DIR` (or a
temp folder). tiktoken's own download has no timeout, so an offline machine can hang on it. This module
therefore never lets tiktoken download: it looks for the cached file itself (checking its sha256), and if
the file is missing it downloads it with a short timeout into tiktoken's cache and only then asks tiktoken
to load it. When that fails the counter falls back, with one logged warning per encoding, to

    UTF-8 bytes of each role and content + per-message overhead

which is a true upper bound for any byte-level BPE tokenizer: every token covers at least one byte.

Encodings are loaded lazily (importing the SDK stays fast), once per process, and on the async path in a
worker thread. Large prompts are also counted in a worker thread so the event loop is never blocked
(tiktoken releases the GIL while encoding).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .._checks import check_number
from .._io import write_atomic
from .._logs import get_logger
from ..errors import ConfigError
from ..providers import ChatRequest, Message

if TYPE_CHECKING:
    from tiktoken import Encoding

__all__ = [
    "BYTES_ESTIMATE",
    "REPLY_OVERHEAD",
    "TOKENS_PER_MESSAGE",
    "TokenCounter",
    "default_encoding_for",
    "load_encoding",
]

# The pseudo-encoding name of the conservative byte-count estimate.
BYTES_ESTIMATE = "bytes"
# OpenAI's chat framing: every message costs 3 tokens plus its fields, every reply is primed with 3.
TOKENS_PER_MESSAGE = 3
REPLY_OVERHEAD = 3

# URL and sha256 of the rank files tiktoken would download, so we can find (and verify) its cache entry.
_KNOWN_FILES: dict[str, tuple[str, str]] = {
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "p50k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
        "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
    ),
    "r50k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
}

# Model-name prefixes of the o200k_base family (gpt-4o class); everything else defaults to cl100k_base.
_O200K_PREFIXES = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "ft:gpt-4o")

_log = get_logger("evomerge_sdk.tokens")
_lock = threading.Lock()
# encoding name -> loaded Encoding, or None once loading failed (the process then uses the estimate).
_loaded: dict[str, Encoding | None] = {}


def default_encoding_for(model: str) -> str:
    """The encoding a model name maps to by default: o200k_base for gpt-4o-class names, else cl100k_base."""
    base = model.rsplit("/", 1)[-1].lower()  # "openai/gpt-4o" and "azure/gpt-4o" count as gpt-4o
    return "o200k_base" if base.startswith(_O200K_PREFIXES) else "cl100k_base"


def _cache_dir() -> str:
    # Mirrors tiktoken.load.read_file_cached, so we look where tiktoken will look.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _cached_file_ok(path: str, sha256: str) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return hashlib.sha256(data).hexdigest() == sha256


def _download(url: str, sha256: str, path: str, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # a fixed https URL
        data = resp.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise OSError(f"downloaded file for {url} has the wrong sha256")
    write_atomic(Path(path), lambda fh: fh.write(data))


def _load_uncached(name: str, download_timeout: float | None) -> Encoding:
    import tiktoken  # deferred: keeps `import evomerge_sdk` fast

    known = _KNOWN_FILES.get(name)
    if known is None:
        return tiktoken.get_encoding(name)  # a plugin encoding: its own loader decides
    url, sha256 = known
    cache_dir = _cache_dir()
    if cache_dir == "":
        raise OSError("TIKTOKEN_CACHE_DIR is empty (tiktoken caching disabled), so tiktoken would download")
    path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    if not _cached_file_ok(path, sha256):
        if not download_timeout:
            raise OSError(f"{name} is not in the tiktoken cache {cache_dir!r} and downloading is disabled")
        _download(url, sha256, path, download_timeout)
    return tiktoken.get_encoding(name)  # reads the verified cache file, never the network


def load_encoding(name: str, *, download_timeout: float | None = 5.0) -> Encoding | None:
    """The tiktoken encoding `name`, or None when it cannot be loaded (logged once; callers then estimate).

    Blocking (file read, maybe a download bounded by `download_timeout` seconds; None or 0 disables the
    download): call it from a worker thread on the async path.
    """
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name in _loaded:
            return _loaded[name]
        enc: Encoding | None
        try:
            enc = _load_uncached(name, download_timeout)
        except Exception as exc:  # offline, unwritable cache, bad plugin: all mean "estimate instead"
            enc = None
            _log.warning(
                "tiktoken_unavailable",
                encoding=name,
                reason=f"{type(exc).__name__}: {exc}",
                fallback="utf-8 bytes + per-message overhead (an upper bound)",
                hint="set TIKTOKEN_CACHE_DIR to a folder holding the tiktoken files to count exactly",
            )
        _loaded[name] = enc
        return enc


def _check_encoding_name(name: str) -> None:
    if name != BYTES_ESTIMATE and not (isinstance(name, str) and name):
        raise ConfigError(f"encoding names must be non-empty strings or {BYTES_ESTIMATE!r}, got {name!r}")


class TokenCounter:
    """Counts prompt tokens per model family; exact with tiktoken, an upper bound without it.

    `encodings` overrides the model -> encoding mapping: keys are exact model names or prefixes ending in
    "*" ("claude-*", or "*" for every model); values are tiktoken encoding names or "bytes" (always use
    the conservative estimate, e.g. for a provider whose tokenizer tiktoken does not know and whose
    budget must hold for certain). Prompts longer than `offload_chars` are counted in a worker thread.
    """

    def __init__(
        self,
        *,
        encodings: Mapping[str, str] | None = None,
        download_timeout: float | None = 5.0,
        offload_chars: int = 16_384,
    ) -> None:
        exact: dict[str, str] = {}
        prefixes: list[tuple[str, str]] = []
        for key, value in (encodings or {}).items():
            _check_encoding_name(value)
            if not isinstance(key, str) or not key:
                raise ConfigError(f"encodings keys must be model names or 'prefix*' patterns, got {key!r}")
            if key.endswith("*"):
                prefixes.append((key[:-1], value))
            else:
                exact[key] = value
        prefixes.sort(key=lambda kv: len(kv[0]), reverse=True)  # longest prefix wins
        check_number("download_timeout", download_timeout, strict=False, allow_none=True, unit="seconds")
        check_number("offload_chars", offload_chars, strict=False, integer=True)
        self._exact = exact
        self._prefixes = prefixes
        self._download_timeout = download_timeout
        self._offload_chars = offload_chars
        self._by_model: dict[str, str] = {}
        self._role_tokens: dict[tuple[str, str], int] = {}

    def encoding_name(self, model: str) -> str:
        """The encoding used for `model` (a tiktoken name, or "bytes" for the estimate)."""
        name = self._by_model.get(model)
        if name is None:
            name = self._exact.get(model)
            if name is None:
                name = next((v for p, v in self._prefixes if model.startswith(p)), None)
            if name is None:
                name = default_encoding_for(model)
            self._by_model[model] = name
        return name

    def encoding(self, model: str) -> Encoding | None:
        """The loaded encoding for `model`, or None when counts are estimates. May block: loads lazily."""
        name = self.encoding_name(model)
        if name == BYTES_ESTIMATE:
            return None
        return load_encoding(name, download_timeout=self._download_timeout)

    async def aencoding(self, model: str) -> Encoding | None:
        """Like `encoding`, but a first load runs in a worker thread so the event loop keeps running."""
        name = self.encoding_name(model)
        if name == BYTES_ESTIMATE:
            return None
        if name in _loaded:
            return _loaded[name]
        return await anyio.to_thread.run_sync(self.encoding, model)

    def is_exact(self, model: str) -> bool:
        """Whether counts for `model` are exact tiktoken counts rather than the byte estimate."""
        return self.encoding(model) is not None

    def count_text(self, text: str, model: str) -> int:
        """Tokens of `text` alone (no chat framing) for `model`, or its UTF-8 byte count without tiktoken."""
        return _count(self.encoding(model), text)

    def count_messages(self, messages: Iterable[Message], model: str) -> int:
        """Prompt tokens of a chat: OpenAI's framing (3 per message + role + content, 3 for the reply)."""
        return self._count_messages(self.encoding(model), tuple(messages))

    def count_request(self, request: ChatRequest) -> int:
        """Prompt tokens of `request` (blocking; see `acount_request` for the async path)."""
        return self._count_messages(self.encoding(request.model), request.messages) + _extra_bound(request)

    async def acount_request(self, request: ChatRequest) -> int:
        """Prompt tokens of `request`, loading the encoding and counting big prompts off the event loop."""
        enc = await self.aencoding(request.model)
        messages = request.messages
        if sum(len(m.content) for m in messages) > self._offload_chars:
            n = await anyio.to_thread.run_sync(self._count_messages, enc, messages)
        else:
            n = self._count_messages(enc, messages)
        return n + _extra_bound(request) if request.extra else n

    def ceiling(self, request: ChatRequest) -> int:
        """The most prompt tokens any byte-level tokenizer can count for `request` (its UTF-8 bytes plus
        framing): an answer reporting more input is impossible, whatever model served it."""
        return self._count_messages(None, request.messages) + _extra_bound(request)

    def _count_messages(self, enc: Encoding | None, messages: tuple[Message, ...]) -> int:
        total = REPLY_OVERHEAD
        for m in messages:
            total += TOKENS_PER_MESSAGE + self._role(enc, m.role) + _count(enc, m.content)
        return total

    def _role(self, enc: Encoding | None, role: str) -> int:
        key = (enc.name if enc is not None else BYTES_ESTIMATE, role)
        n = self._role_tokens.get(key)
        if n is None:
            n = self._role_tokens[key] = _count(enc, role)
        return n


# Request fields that the API turns into prompt tokens; bounded by their JSON's UTF-8 size.
_PROMPT_EXTRAS = ("tools", "functions", "response_format", "tool_choice")


def _extra_bound(request: ChatRequest) -> int:
    extra = request.extra
    if not extra:
        return 0
    total = 0
    for field in _PROMPT_EXTRAS:
        if field in extra:
            total += len(json.dumps(extra[field], ensure_ascii=False, default=str).encode("utf-8"))
    return total


def _count(enc: Encoding | None, text: str) -> int:
    if enc is None:
        return len(text.encode("utf-8"))
    # encode_ordinary: text that looks like a special token is ordinary text in a user's prompt.
    return len(enc.encode_ordinary(text))
