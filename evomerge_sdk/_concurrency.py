"""Run jobs concurrently and fail with the SDK's own error, never an ExceptionGroup.

A task group whose children fail raises an ExceptionGroup, which `except ProviderError` or `except
BudgetExceeded` do not catch. Users catch the SDK's errors, so the first failure is raised as itself;
the others are named in a note on it (and kept in its `others` attribute). A budget refusal ranks after
any other failure, since the other failure is the cause worth reporting.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import anyio

from .errors import BudgetExceeded

__all__ = ["run_concurrently"]

Job = Callable[[], Awaitable[None]]


def _never(_exc: Exception) -> bool:
    return False


async def run_concurrently(jobs: Iterable[Job], *, keep_going: Callable[[Exception], bool] = _never) -> None:
    """Await every job concurrently; raise the first failure (see the module doc).

    A failure cancels the jobs still running unless `keep_going(failure)` is true (a spent budget, say,
    where the jobs already paid for should finish and be kept).
    """
    errors: list[tuple[int, Exception]] = []

    async def one(i: int, job: Job, scope: anyio.CancelScope) -> None:
        try:
            await job()
        except Exception as exc:
            errors.append((i, exc))
            if not keep_going(exc):
                scope.cancel()

    async with anyio.create_task_group() as tg:
        for i, job in enumerate(jobs):
            tg.start_soon(one, i, job, tg.cancel_scope)
    if errors:
        errors.sort(key=lambda e: (isinstance(e[1], BudgetExceeded), e[0]))
        first = errors[0][1]
        others = [e for _, e in errors[1:]]
        if others:
            shown = "; ".join(f"{type(e).__name__}: {e}"[:200] for e in others[:3])
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            vars(first).setdefault("__notes__", []).append(f"{len(others)} other failure(s): {shown}{more}")
        vars(first)["others"] = tuple(others)
        raise first
