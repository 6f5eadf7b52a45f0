"""The demo's verdict: one case claims a win only when its own paired interval over the test prompts
excludes zero; otherwise it says the case is a tie and quotes the multi-case result."""

from __future__ import annotations

import attrs
import numpy as np

from evomerge_sdk.demo import EVO, LORAHUB_ROW, MULTI_CASE, DemoRow, judge, verdict


def row(name: str, correct: np.ndarray) -> DemoRow:
    bits = "".join("1" if c else "0" for c in correct)
    accuracy = float(np.mean(correct))
    return DemoRow(name, accuracy, accuracy, 1.0, 1.0, 0, 0, correct=bits)


def case(evo_right: int, hub_right: int, both: int, n: int = 1000) -> list[DemoRow]:
    """Evo right alone on `evo_right` prompts, LoRAHub-style alone on `hub_right`, both on `both`."""
    evo = np.zeros(n, bool)
    hub = np.zeros(n, bool)
    evo[:both] = hub[:both] = True
    evo[both : both + evo_right] = True
    hub[both + evo_right : both + evo_right + hub_right] = True
    weak = np.zeros(n, bool)
    weak[: both // 2] = True
    return [row(EVO, evo), row(LORAHUB_ROW, hub), row("best single adapter", weak)]


def test_a_clear_win_is_claimed() -> None:
    rows = case(evo_right=120, hub_right=20, both=300)
    v = judge(rows)
    assert v.outcome == "win" and v.rival == LORAHUB_ROW and v.low > 0
    assert v.difference == 10.0 and v.prompts == 1000
    assert verdict(rows).startswith(f"{EVO} beats every other row in this case")


def test_a_higher_score_inside_its_noise_is_a_tie_that_quotes_the_multi_case_result() -> None:
    # Evo-Merging is ahead by 0.6 points: more right answers, but not a win its interval supports.
    rows = case(evo_right=40, hub_right=34, both=400)
    assert rows[0].test_accuracy > rows[1].test_accuracy
    v = judge(rows)
    assert v.outcome == "tie" and v.low < 0 < v.high
    text = verdict(rows)
    assert text.startswith("This case is a tie") and "beats" not in text
    assert MULTI_CASE in text
    assert verdict(rows, multi_case="over 99 cases it is +1").endswith("over 99 cases it is +1.")


def test_a_clear_loss_is_reported_as_behind() -> None:
    rows = case(evo_right=10, hub_right=110, both=300)
    assert judge(rows).outcome == "behind"
    assert verdict(rows).startswith(f"{EVO} is behind {LORAHUB_ROW}")


def test_a_win_needs_every_row_not_only_the_strongest() -> None:
    rows = case(evo_right=120, hub_right=20, both=300)
    # A third row that ties Evo-Merging prompt for prompt: no win against it, whatever its accuracy.
    twin = attrs.evolve(rows[0], name="TIES")
    assert judge([*rows, twin]).outcome == "tie"


def test_rows_without_per_prompt_results_are_never_a_win() -> None:
    plain = [DemoRow(EVO, 0.9, 0.9, 1.0, 1.0, 0, 0), DemoRow(LORAHUB_ROW, 0.1, 0.1, 1.0, 1.0, 0, 0)]
    v = judge(plain)
    assert v.outcome == "tie" and v.difference == 80.0
    assert "no per-prompt results to pair" in verdict(plain)
