"""Per-attempt timeouts with one loop timer per scheduler, instead of one per attempt.

`asyncio.timeout` arms a timer handle for every attempt and cancels it when the attempt ends; at
thousands of attempts a second that bookkeeping is the largest single cost the scheduler adds to a request
(benchmarks/scheduler.py, adapter_overhead_ratio). Every attempt of one scheduler has the same timeout,
so deadlines come in the order attempts start: a FIFO of them needs a single timer, armed for the earliest
open one. An expired attempt is cancelled like `asyncio.timeout` does it (`task.cancel()`, then
`uncancel()` when the CancelledError comes back, which `Deadlines.expired` turns into TimeoutError), so a
cancellation from elsewhere still propagates untouched.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque

__all__ = ["Deadline", "Deadlines"]


class Deadline:
    """One attempt's deadline: `finish()` it when the attempt ends, whatever the outcome."""

    __slots__ = ("at", "cancelling", "expired", "task")

    def __init__(self, task: asyncio.Task[object] | None, at: float, cancelling: int) -> None:
        self.task = task
        self.at = at
        self.cancelling = cancelling
        self.expired = False

    def finish(self) -> None:
        """The attempt is over: its deadline no longer cancels anything."""
        self.task = None


class Deadlines:
    """The open deadlines of one scheduler's attempts (one event loop; asyncio only)."""

    __slots__ = ("_handle", "_open", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._open: deque[Deadline] = deque()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> Deadline:
        """The deadline of an attempt starting now in the current task."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        deadline = Deadline(task, loop.time() + self.timeout, _cancelling(task))
        q = self._open
        while q and q[0].task is None:  # attempts that ended: nothing left to time
            q.popleft()
        q.append(deadline)
        if self._handle is None:
            self._handle = loop.call_at(q[0].at, self._expire)
        return deadline

    def expired(self, deadline: Deadline) -> bool:
        """After a CancelledError in the attempt: whether it was this deadline's (then the caller raises
        TimeoutError), undoing the cancellation it requested, as `asyncio.timeout` does."""
        return deadline.expired and _uncancel(asyncio.current_task()) <= deadline.cancelling

    def _expire(self) -> None:
        self._handle = None
        q = self._open
        now = asyncio.get_running_loop().time()
        while q and (q[0].task is None or q[0].at <= now):
            deadline = q.popleft()
            if deadline.task is not None:
                deadline.expired = True
                deadline.task.cancel()
                deadline.task = None
        if q:
            self._handle = asyncio.get_running_loop().call_at(q[0].at, self._expire)

    def close(self) -> None:
        """Disarm the timer (the scheduler is closing)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._open.clear()


def _cancelling(task: asyncio.Task[object] | None) -> int:
    if sys.version_info >= (3, 11) and task is not None:  # Deadlines is used from 3.11 on only
        return task.cancelling()
    return 0


def _uncancel(task: asyncio.Task[object] | None) -> int:
    if sys.version_info >= (3, 11) and task is not None:
        return task.uncancel()
    return 0
