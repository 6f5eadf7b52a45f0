"""A bound on the answer bytes a client holds at once, across its concurrent requests.

Each answer is capped on its own (`HTTPClient.max_answer_bytes`), but fifty requests in flight could still
hold fifty capped answers, and parsing JSON takes many times its size in memory. Answers beyond a small
free allowance therefore take their size from this gate before they are read (their Content-Length, or
the cap when the server does not say), hold it while they are parsed, and give it back after; a request
that does not fit waits, first come first served. A waiter holds nothing, so waiting cannot deadlock.
"""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["ByteGate"]


class _Waiter:
    __slots__ = ("event", "granted", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.event = anyio.Event()
        self.granted = False


class ByteGate:
    """`limit` bytes shared FIFO by concurrent answers (one event loop; see module doc)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        """The most bytes held at once so far (benchmarks and tests read it)."""
        self._waiters: deque[_Waiter] = deque()

    async def acquire(self, size: int) -> None:
        """Take `size` bytes (at most `limit`), waiting for earlier holders to give theirs back."""
        size = min(size, self.limit)
        if not self._waiters and self.held + size <= self.limit:
            self._take(size)
            return
        waiter = _Waiter(size)
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release(size)
            else:
                self._waiters.remove(waiter)
                self._wake()
            raise

    def release(self, size: int) -> None:
        """Give `size` bytes back and let waiters that now fit in."""
        self.held -= min(size, self.limit)
        self._wake()

    def _take(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)

    def _wake(self) -> None:
        while self._waiters and self.held + self._waiters[0].size <= self.limit:
            waiter = self._waiters.popleft()
            self._take(waiter.size)
            waiter.granted = True
            waiter.event.set()
