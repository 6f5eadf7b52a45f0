"""The scheduler's concurrency slots: a FIFO counting semaphore whose uncontended acquire never awaits.

`anyio.Semaphore` costs about 5 us per `async with` even when a slot is free (a cancellation checkpoint
and two method layers); the scheduler takes a slot on every call, so at tens of thousands of calls a
second that is a measurable share of the overhead budget (benchmarks/scheduler.py). Here a free slot is
one integer decrement; only a caller that must wait creates an event.
"""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["Slots"]


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class Slots:
    """`max_concurrency` slots, handed to waiters first come, first served (single event loop)."""

    __slots__ = ("_free", "_waiters")

    def __init__(self, count: int) -> None:
        self._free = count
        self._waiters: deque[_Waiter] = deque()

    @property
    def value(self) -> int:
        """Slots free right now."""
        return self._free

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is queued for it (no await)."""
        if self._free and not self._waiters:
            self._free -= 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a slot (FIFO). A waiter cancelled after being handed one passes it on."""
        if self.try_acquire():
            return
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release()
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: to the first waiter, else to the pool."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            waiter.event.set()
        else:
            self._free += 1
