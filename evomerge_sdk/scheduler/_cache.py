"""The response cache: in memory, and optionally in a SQLite file so a stopped run does not pay twice.

Keys are hex SHA-256 digests of a canonical request (`cache_key`). Values are JSON-serialisable results
plus the `Usage` they cost. The memory layer answers on the event loop with no I/O. The SQLite layer
(stdlib sqlite3, WAL, file created 0600) is written by one background thread that batches inserts, so
the event loop never waits for a disk write; at open, the keys on disk are read (in a worker thread) so
a miss that is not on disk costs no I/O either, and a hit on disk is read in a worker thread.

Durability: a result is committed within milliseconds of being stored; `flush()` waits until everything
stored so far is committed (a checkpoint). A killed process loses at most the results of that last
moment, which are then simply asked again.

Cached values are shared between callers: treat them as read-only.

The cache never fails silently. A result the writer cannot store (not JSON, a number SQLite cannot hold, a
disk that is full or read-only) is counted in `write_errors`, logged (`cache_write_failed`), and raised as
a `StorageError` naming the file by the next `flush()`; the writer keeps going with the rows after it. A
damaged row (not JSON, impossible token counts, or a value the caller's check refuses) is skipped and
counted in `damaged_rows`, logged (`cache_row_damaged`, naming the file): the request is asked again, as
on a miss, and its fresh answer replaces the row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import anyio
import attrs

from .._checks import check_number
from .._io import canonical_json
from .._logs import get_logger
from ..errors import ConfigError, StorageError
from ..providers import ChatRequest, Message, Usage
from ._budget import MAX_REPORTED_TOKENS

__all__ = ["CachedValue", "ResponseCache", "cache_key", "chat_cache_key"]

_log = get_logger("evomerge_sdk.cache")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL
) WITHOUT ROWID
"""
_COLUMNS = ("key", "value", "input_tokens", "output_tokens", "cached_tokens")
_BATCH = 256


def cache_key(*parts: str) -> str:
    """A cache key: the hex SHA-256 of the parts (which should be canonical, e.g. sorted-keys JSON)."""
    # Length-prefixed (in characters), so ("ab", "c") and ("a", "bc") differ; one encode, one hash.
    framed = "".join([f"{len(part)}:{part}" for part in parts])
    return hashlib.sha256(framed.encode("utf-8")).hexdigest()


# The fields the fast chat key serialises; if the request types ever grow, fall back to canonical_json.
_CHAT_FIELDS = (
    "model",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "logprobs",
    "top_logprobs",
    "extra",
)
_FAST_CHAT_KEY = tuple(f.name for f in attrs.fields(ChatRequest)) == _CHAT_FIELDS and tuple(
    f.name for f in attrs.fields(Message)
) == ("role", "content")


def chat_cache_key(provider_name: str, request: ChatRequest) -> str:
    """The cache key of a chat request sent to a provider: every request field, canonically (sorted keys)."""
    if not _FAST_CHAT_KEY:
        return cache_key("chat/v1", provider_name, request.canonical_json())
    # The same information as canonical_json, hashed field by field (5x faster than attrs.asdict + JSON):
    # strings as they are, the scalars by repr (stable across Python versions), extra as sorted JSON.
    parts = ["chat/v2", provider_name, request.model, str(len(request.messages))]
    for m in request.messages:
        parts.append(m.role)
        parts.append(m.content)
    parts.append(
        repr((request.max_tokens, request.temperature, request.top_p, request.logprobs, request.top_logprobs))
    )
    parts.append(canonical_json(request.extra) if request.extra else "")
    return cache_key(*parts)


@attrs.frozen
class CachedValue:
    """A cached result and the usage it cost when it was first obtained."""

    value: Any
    usage: Usage


def _safe_log(event: str, **fields: Any) -> None:
    """Log from the writer thread; a broken log sink (a closed stream) must not kill the writer."""
    with contextlib.suppress(Exception):  # nothing better to do with a log that cannot be written
        _log.error(event, **fields)


class _Writer(threading.Thread):
    """Owns the write connection; commits batches as they come; a `threading.Event` item is a flush mark."""

    def __init__(self, path: str) -> None:
        super().__init__(name="evomerge-cache-writer", daemon=True)
        self.path = path
        self.items: queue.SimpleQueue[tuple[str, Any, Usage] | threading.Event | None] = queue.SimpleQueue()
        self.errors = 0
        self.first_error = ""  # the first failure's text, for the StorageError the next flush raises
        self.stopped = threading.Event()

    def _failed(self, rows: int, event: str, exc: BaseException, key: str = "") -> None:
        self.errors += rows
        text = f"{type(exc).__name__}: {exc}"
        if not self.first_error:
            self.first_error = text
        _safe_log(event, file=self.path, rows=rows, key=key[:16], error=text)

    def _insert(self, conn: sqlite3.Connection, batch: list[tuple[str, str, int, int, int]]) -> None:
        """Commit `batch`; when it fails, row by row, so one bad row costs only itself."""
        sql = "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)"
        try:
            with conn:
                conn.executemany(sql, batch)
            return
        except Exception as exc:  # sqlite3.Error, OverflowError (>= 2^63), MemoryError...
            if len(batch) == 1:
                self._failed(1, "cache_write_failed", exc, batch[0][0])
                return
        for row in batch:
            self._insert(conn, [row])

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
        except Exception as exc:  # the file vanished or the disk is gone: count every row, stay alive
            conn = None
            self._failed(0, "cache_write_failed", exc)
        try:
            if conn is not None:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: survives a process crash
            stop = False
            while not stop:
                batch: list[tuple[str, str, int, int, int]] = []
                marks: list[threading.Event] = []
                item = self.items.get()
                while True:
                    if item is None:
                        stop = True
                    elif isinstance(item, threading.Event):
                        marks.append(item)
                    else:
                        row = self._row(item)
                        if row is not None:
                            batch.append(row)
                    if stop or len(batch) >= _BATCH:
                        break
                    try:
                        item = self.items.get_nowait()
                    except queue.Empty:
                        break
                try:
                    if batch and conn is not None:
                        self._insert(conn, batch)
                    elif batch:
                        self.errors += len(batch)
                except Exception as exc:  # never let the writer die: later rows still get their chance
                    self._failed(len(batch), "cache_write_failed", exc)
                finally:  # a flush never waits for a mark nobody will set
                    for mark in marks:
                        mark.set()
        finally:
            self.stopped.set()
            if conn is not None:
                conn.close()

    def _row(self, item: tuple[str, Any, Usage]) -> tuple[str, str, int, int, int] | None:
        key, value, usage = item
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            self._failed(1, "cache_value_not_json", exc, key)
            return None
        return key, text, usage.input_tokens, usage.output_tokens, usage.cached_tokens


class ResponseCache:
    """Memory (optionally LRU-bounded) in front of an optional SQLite file. Open it before use.

    A `Scheduler` opens and closes the cache it is given; one cache may serve several schedulers in turn.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, max_memory_entries: int | None = None
    ) -> None:
        check_number("max_memory_entries", max_memory_entries, integer=True, allow_none=True)
        self.path = os.fspath(path) if path is not None else None
        if self.path is not None and os.path.isdir(self.path):
            raise ConfigError(f"cache path {self.path!r} is a directory; give a file name")
        self._max = max_memory_entries
        self._memory: OrderedDict[str, CachedValue] = OrderedDict()
        self._on_disk: set[str] = set()
        self._writer: _Writer | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._opens = 0
        self.damaged_rows = 0
        """Rows of the file that were damaged (see module doc): skipped, asked again."""
        self._closed_errors = 0  # write errors of writers already closed
        self._reported_errors = 0  # of the current writer's, those a flush already raised

    def __len__(self) -> int:
        return len(self._memory) + sum(1 for k in self._on_disk if k not in self._memory)

    @property
    def write_errors(self) -> int:
        """Results that could not be written to disk (not JSON-serialisable, or a SQLite error)."""
        return self._closed_errors + (self._writer.errors if self._writer is not None else 0)

    async def open(self) -> None:
        """Open the SQLite file (creating it user-only, mode 0600) and read its keys, off the event loop."""
        self._opens += 1
        if self._opens > 1 or self.path is None:
            return
        try:
            await anyio.to_thread.run_sync(self._open_sync)
        except BaseException:
            self._opens -= 1
            raise

    def _check_is_ours(self, conn: sqlite3.Connection) -> None:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = [row[1] for row in conn.execute("PRAGMA table_info(responses)")]
        if tables - {"responses"} or (columns and columns != list(_COLUMNS)):
            conn.close()
            found = ", ".join(sorted(tables))
            raise ConfigError(
                f"cache file {self.path!r} is a SQLite database with other tables ({found}); "
                "a response cache needs a file of its own"
            )

    def _open_sync(self) -> None:
        assert self.path is not None
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise ConfigError(f"cache path {self.path!r}: folder {parent!r} does not exist")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # sqlite would create it world-readable
        os.close(fd)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._check_is_ours(conn)  # before WAL or the schema touch a database the user keeps
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
            self._on_disk = {row[0] for row in conn.execute("SELECT key FROM responses")}
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ConfigError(f"cache file {self.path!r} is not a usable SQLite database: {exc}") from exc
        self._reader = conn
        self._writer = _Writer(self.path)
        self._writer.start()

    def get(self, key: str) -> CachedValue | None:
        """The cached value if it is in memory (no I/O)."""
        hit = self._memory.get(key)
        if hit is not None and self._max is not None:
            self._memory.move_to_end(key)
        return hit

    def on_disk(self, key: str) -> bool:
        """Whether `key` is stored in the SQLite file (known without I/O)."""
        return key in self._on_disk

    async def load(self, key: str, check: Callable[[Any], bool] | None = None) -> CachedValue | None:
        """Read `key` from the SQLite file in a worker thread (and keep it in memory).

        A damaged row (see module doc; `check(value)` False also counts) is a miss, counted and logged.
        """
        if self._reader is None or key not in self._on_disk:
            return None
        hit = await anyio.to_thread.run_sync(self._read_sync, key)
        if isinstance(hit, str) or (hit is not None and check is not None and not check(hit.value)):
            self.damaged_rows += 1
            self._on_disk.discard(key)  # asked again; the fresh answer replaces the row
            reason = hit if isinstance(hit, str) else "the value has the wrong shape for this call"
            _log.warning("cache_row_damaged", file=self.path, key=key[:16], reason=reason)
            return None
        if hit is not None:
            self._remember(key, hit)
        return hit

    def _read_sync(self, key: str) -> CachedValue | str | None:
        """The row of `key`, None when there is none, or why it is damaged."""
        assert self._reader is not None
        with self._read_lock:
            row = self._reader.execute(
                "SELECT value, input_tokens, output_tokens, cached_tokens FROM responses WHERE key = ?",
                (key,),
            ).fetchone()
        if row is None:
            return None
        counts = row[1:]
        if any(type(c) is not int or not 0 <= c <= MAX_REPORTED_TOKENS for c in counts):
            return f"impossible token counts {counts!r:.80}"
        try:
            value = json.loads(row[0])
        except (TypeError, ValueError, RecursionError) as exc:
            return f"the value is not JSON ({type(exc).__name__})"
        return CachedValue(value, Usage(*counts))

    def put(self, key: str, value: Any, usage: Usage) -> None:
        """Store a result: in memory now, on disk by the writer thread shortly after."""
        hit = CachedValue(value, usage)
        self._remember(key, hit)
        if self._writer is not None:
            self._writer.items.put((key, value, usage))
            self._on_disk.add(key)

    def _remember(self, key: str, hit: CachedValue) -> None:
        self._memory[key] = hit
        if self._max is not None and len(self._memory) > self._max:
            self._memory.popitem(last=False)

    def abandon(self, key: str) -> None:
        """The call for `key` ended without a result; in one process there is no claim to give up."""

    async def flush(self) -> None:
        """Wait until every result stored so far is committed to the SQLite file (a checkpoint)."""
        if self._writer is None:
            return
        writer = self._writer
        mark = threading.Event()
        writer.items.put(mark)

        def wait() -> None:
            # Returns when the mark is set, or when the writer has stopped (it sets no more marks).
            while not mark.wait(0.05):
                if writer.stopped.is_set() or not writer.is_alive():
                    return

        await anyio.to_thread.run_sync(wait)
        failed = writer.errors - self._reported_errors
        if failed:
            self._reported_errors = writer.errors
            first, writer.first_error = writer.first_error, ""
            raise StorageError(
                f"cache file {self.path!r}: {failed} result(s) could not be written since the last flush "
                f"(first: {first:.200}); they will be asked again on a resume"
            )

    async def aclose(self) -> None:
        """Commit what is pending and close the file (the memory layer stays usable)."""
        if self._opens == 0:
            return
        self._opens -= 1
        if self._opens > 0:
            return
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if writer is not None:
            writer.items.put(None)
            with anyio.CancelScope(shield=True):  # a cancelled shutdown must still finish the write
                await anyio.to_thread.run_sync(writer.join)
            self._closed_errors += writer.errors
            self._reported_errors = 0
        if reader is not None:
            reader.close()
