"""`evomerge demo --mode output` reports every phase (scoring passes prompt by prompt, searches by
generation), writes convergence.png, honours --budget (a budget too small fails before the first
request, naming the amount) and --search-evaluations."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from evomerge_sdk.demo import OutputDemoConfig, run_output_demo
from evomerge_sdk.errors import BudgetExceeded
from evomerge_sdk.objectives import ScoringProgress


class Recorder:
    """A reporter that keeps what it was told."""

    def __init__(self) -> None:
        self.phases: list[str] = []
        self.searches: list[tuple[str, Any]] = []
        self.scoring_seen: dict[str, list[ScoringProgress]] = {}

    def phase(self, text: str) -> None:
        self.phases.append(text)

    def search(self, row: str, progress: Any, spent_tokens: int, budget_tokens: int) -> None:
        self.searches.append((row, progress))

    def scoring(self, task: str, progress: ScoringProgress) -> None:
        self.scoring_seen.setdefault(task, []).append(progress)

    def close(self) -> None:
        pass


def _config(tmp_path: Path, **changes: Any) -> OutputDemoConfig:
    return OutputDemoConfig(
        quick=True, small_repository=True, pool_size=4, out_dir=tmp_path / "out", **changes
    )


def test_every_phase_reports_and_the_plot_is_written(tmp_path: Path) -> None:
    recorder = Recorder()
    result = run_output_demo(_config(tmp_path, search_evaluations=60), recorder)
    assert set(recorder.scoring_seen) == {"scoring validation", "scoring held-out", "scoring test"}
    for task, seen in recorder.scoring_seen.items():
        assert [p.done for p in seen] == list(range(1, seen[-1].total + 1)), task
    assert any(row == "Evo-Merging" for row, _ in recorder.searches)
    assert any(text.startswith("Planned: ") and "tokens" in text for text in recorder.phases)
    assert result.plot_path == tmp_path / "out" / "convergence.png"
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --search-evaluations sizes both searches
    assert result.evo.evaluations <= 60
    assert result.document["config"]["search_evaluations"] == 60


def test_a_budget_too_small_fails_before_the_first_request(tmp_path: Path) -> None:
    with pytest.raises(BudgetExceeded) as refused:
        run_output_demo(_config(tmp_path, budget_tokens=5_000))
    message = str(refused.value)
    assert "nothing was sent" in message
    needed = int(re.search(r"at least ([\d,]+) tokens", message).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert needed > 5_000
    # the amount named is enough
    result = run_output_demo(_config(tmp_path, budget_tokens=needed))
    assert sum(s.tokens for s in result.spend) <= needed
