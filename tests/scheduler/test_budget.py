"""The hard budget: validation, prices, and property tests that the limit is never exceeded."""

from __future__ import annotations

import random

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge_sdk import BudgetExceeded, ConfigError, Usage
from evomerge_sdk.scheduler import Budget, BudgetLedger, ModelPrice, Price, PriceTable, Scheduler


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"tokens": 0}, "Budget.tokens"),
        ({"tokens": -10}, "Budget.tokens"),
        ({"tokens": 1.5}, "Budget.tokens"),
        ({"usd": 0.0}, "Budget.usd"),
        ({"usd": -1.0}, "Budget.usd"),
        ({"usd": float("nan")}, "Budget.usd"),
        ({}, "needs tokens"),
    ],
)
def test_bad_budgets_fail_at_construction(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Budget(**kwargs)  # type: ignore[arg-type]


def test_bad_prices_fail_at_construction() -> None:
    with pytest.raises(ConfigError, match=r"Price\.input"):
        Price(-1.0, 1.0)
    with pytest.raises(ConfigError, match="Price"):
        PriceTable({"m": (1.0, 2.0)})  # type: ignore[dict-item]


def test_price_lookup_is_exact_or_a_dated_snapshot_never_a_loose_prefix() -> None:
    table = PriceTable({"my-model": Price(1.0, 2.0)})
    assert table.get("my-model") == Price(1.0, 2.0)
    assert table.get("gpt-4o-mini-2024-07-18") == table.get("gpt-4o-mini")
    assert table.get("claude-3-5-haiku-20241022") == table.get("claude-3-5-haiku")
    assert table.get("gpt-4o-mini-tts") is None
    assert PriceTable(defaults=False).get("gpt-4o") is None
    with pytest.raises(ConfigError, match="no price for model 'mystery'"):
        table.require("mystery")


def test_usd_budget_needs_every_model_priced_up_front() -> None:
    with pytest.raises(ConfigError, match="needs models"):
        Scheduler(budget=Budget(usd=1.0))
    with pytest.raises(ConfigError, match="no price for model 'mystery'"):
        Scheduler(budget=Budget(usd=1.0), models=["gpt-4o-mini", "mystery"])
    s = Scheduler(budget=Budget(usd=1.0), models=["mystery"], prices={"mystery": Price(1.0, 2.0)})
    assert s.price("mystery").priced
    with pytest.raises(ConfigError, match="not among the models"):
        s.price("gpt-4o")
    # A token budget needs no prices; unknown models then cost nothing in USD.
    assert not Scheduler(budget=Budget(tokens=100)).price("mystery").priced


def test_costs_are_exact_picodollars_rounded_up() -> None:
    p = ModelPrice.of("m", Price(input=2.5, output=10.0, cached_input=1.25))
    assert p.worst(1000, 100) == 1000 * 2_500_000 + 100 * 10_000_000
    assert p.cost(Usage(1000, 100, 400)) == 600 * 2_500_000 + 400 * 1_250_000 + 100 * 10_000_000
    # A price with more precision than a picodollar per token rounds up, never down.
    assert ModelPrice.of("m", Price(input=0.0000001, output=0.0)).input == 1
    # A "cached" price above the input price is capped: the worst case stays a bound.
    assert ModelPrice.of("m", Price(1.0, 1.0, cached_input=5.0)).cached == 1_000_000


ops = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "settle", "release", "charge"]),
        st.integers(min_value=0, max_value=400),
        st.floats(min_value=0.0, max_value=1.0),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=2000), st.integers(min_value=1, max_value=10**9), ops)
def test_spent_plus_reserved_never_passes_the_limit(limit: int, limit_pico: int, sequence: list) -> None:  # type: ignore[type-arg]
    ledger = BudgetLedger(Budget(tokens=limit, usd=limit_pico / 1e12))
    open_res = []
    for op, tokens, frac in sequence:
        if op == "reserve":
            pico = tokens * 1000
            never = ledger.spend().tokens + tokens > limit or ledger.spent_pico + pico > ledger._limit_pico  # type: ignore[operator]
            try:
                res = ledger.try_reserve(tokens, pico)
            except BudgetExceeded as exc:
                assert never
                assert exc.spent.tokens == ledger.spend().tokens
                continue
            assert not never
            if res is not None:
                open_res.append(res)
        elif open_res:
            res = open_res.pop(int(frac * (len(open_res) - 1)))
            if op == "settle":  # the actual usage is at most the reservation
                used = int(res.tokens * frac)
                ledger.settle(res, Usage(used // 2, used - used // 2), int(res.pico * frac))
            elif op == "release":
                ledger.release(res)
            else:
                ledger.charge_reserved(res)
        spend = ledger.spend()
        assert spend.tokens + spend.reserved_tokens <= limit
        assert ledger.spent_pico + ledger._reserved_pico <= ledger._limit_pico  # type: ignore[operator]
        assert spend.reserved_tokens == sum(r.tokens for r in open_res)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=50, max_value=3000),
    st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=120),
    st.integers(min_value=0, max_value=2**32),
)
def test_concurrent_callers_never_overspend_and_all_finish(limit: int, worst: list[int], seed: int) -> None:
    rng = random.Random(seed)
    outcome: dict[str, int] = {"done": 0, "refused": 0}
    refused: list[int] = []

    async def main() -> BudgetLedger:
        ledger = BudgetLedger(Budget(tokens=limit))

        async def caller(w: int) -> None:
            try:
                res = await ledger.reserve(w, 0)
            except BudgetExceeded:
                outcome["refused"] += 1
                refused.append(w)
                return
            await anyio.sleep(rng.random() * 0.002)
            kind = rng.random()
            if kind < 0.1:
                ledger.release(res)
            elif kind < 0.2:
                ledger.charge_reserved(res)
            else:
                used = rng.randint(0, w)
                ledger.settle(res, Usage(used, 0), 0)
            outcome["done"] += 1

        with anyio.fail_after(30):  # a hang guard, not a timing assertion
            async with anyio.create_task_group() as tg:
                for w in worst:
                    tg.start_soon(caller, w)
        return ledger

    ledger = anyio.run(main)
    spend = ledger.spend()
    assert spend.tokens <= limit
    assert spend.reserved_tokens == 0
    assert outcome["done"] + outcome["refused"] == len(worst)
    # Nobody was refused while the budget could still have covered them (spend only grows).
    assert all(spend.tokens + w > limit for w in refused)


@pytest.mark.anyio
async def test_a_caller_waits_for_in_flight_reservations_instead_of_failing_early() -> None:
    ledger = BudgetLedger(Budget(tokens=1000))
    first = ledger.try_reserve(600, 0)
    assert first is not None
    assert ledger.try_reserve(600, 0) is None  # does not fit now, but could after `first` settles
    got = []

    async def second() -> None:
        got.append(await ledger.reserve(600, 0))

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.sleep(0.01)
        assert not got
        ledger.settle(first, Usage(100, 50), 0)
    assert got and ledger.spend().reserved_tokens == 600
    ledger.settle(got[0], Usage(700, 100), 0)
    with pytest.raises(BudgetExceeded, match="950 of 1000 tokens") as info:
        await ledger.reserve(100, 0)  # can never fit: refused at once, with the spend so far
    assert info.value.spent.tokens == 950
    assert info.value.spent.reserved_tokens == 0
