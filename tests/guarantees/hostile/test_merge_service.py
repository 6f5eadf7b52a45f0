"""Hostile merge services cannot slip past the budget (issue 16, the merge-service rows).

A loopback merge service that offers the `usage` extension but answers `usage: {}`, `usage: null` or no
usage at all, or declares a tiny `max_tokens_per_evaluation` / `max_tokens_per_example` while it scores
its whole data set: the client reserves each evaluation from what it asks (examples x its
own per-example bound, never a number the server declares) and charges an answer without usable usage its
whole reservation, so the tokens the server really served never pass the budget.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import numpy as np
import pytest
from aiohttp import web

from evomerge_sdk import BudgetExceeded, MergeServiceClient
from evomerge_sdk.scheduler import Budget, Scheduler

pytestmark = pytest.mark.anyio

EXAMPLES = 300  # what every evaluation of this service really scores...
TOKENS = 24  # ...at this many tokens each
BUDGET = 7_200  # the budget: one evaluation's worth


@attrs.define
class Served:
    url: str = ""
    evaluations: int = 0

    @property
    def tokens(self) -> int:
        return self.evaluations * EXAMPLES * TOKENS


@asynccontextmanager
async def merge_service(
    usage: Callable[[], Any], session_extra: dict[str, Any] | None = None
) -> AsyncIterator[Served]:
    """A merge service scoring EXAMPLES x TOKENS per evaluation and answering `usage()` as its usage
    (... = omitted); its session answers carry `session_extra`."""
    served = Served()

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "extensions": ["usage"], "concurrent_evaluation": "safe"})

    async def sessions(request: web.Request) -> web.Response:
        answer = {"session_id": "s1", "preset_id": "p", "adapter_count": 3, "query_plus": {}}
        return web.json_response({**answer, "n_examples": EXAMPLES, **(session_extra or {})})

    async def evaluate(request: web.Request) -> web.Response:
        await request.json()
        served.evaluations += 1
        answer: dict[str, Any] = {"loss": 1.25}
        reported = usage()
        if reported is not ...:
            answer["usage"] = reported
        return web.json_response(answer)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/sessions", sessions)
    app.router.add_post("/v1/sessions/{sid}/evaluate", evaluate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    served.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield served
    finally:
        await runner.cleanup()


async def spend_until_refused(served: Served) -> tuple[int, int]:
    """Evaluate until the budget refuses; (evaluations answered, tokens charged)."""
    async with (
        Scheduler(budget=Budget(tokens=BUDGET), cache=False) as scheduler,
        MergeServiceClient(served.url, scheduler=scheduler, tokens_per_example=TOKENS) as client,
    ):
        session = await client.create_session("p")
        assert session.tokens_per_evaluation == EXAMPLES * TOKENS  # from what it asks, not what it declares
        answered = 0
        with pytest.raises(BudgetExceeded):
            for i in range(20):
                await client.evaluate(session, np.ones(3), np.full(3, 0.1 * i))
                answered += 1
        return answered, scheduler.spent().tokens


@pytest.mark.parametrize(
    "usage", [..., None, {}, {"total_tokens": 7}], ids=["absent", "null", "empty", "partial"]
)
async def test_an_answer_without_usage_is_charged_its_reservation(usage: Any) -> None:
    async with merge_service(lambda: usage) as served:
        answered, charged = await spend_until_refused(served)
    assert answered == 1 and charged == EXAMPLES * TOKENS
    assert served.tokens <= BUDGET  # the server never scored past the budget


@pytest.mark.parametrize(
    "declared",
    [
        {"max_tokens_per_evaluation": 1, "max_tokens_per_example": 1},
        {"max_tokens_per_evaluation": 0},
    ],
    ids=["tiny", "zero"],
)
async def test_a_tiny_declared_cost_does_not_shrink_the_reservation(declared: dict[str, Any]) -> None:
    async with merge_service(lambda: {}, declared) as served:
        answered, charged = await spend_until_refused(served)
    assert answered == 1 and charged <= BUDGET
    assert served.tokens <= BUDGET  # 144,000 tokens were served against this budget before
