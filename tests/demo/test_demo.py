"""`evomerge demo --quick` end to end: the table, result.json and convergence.png, and the same seed gives
the same result (the CLI run and a library run are compared field by field, timings aside)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from evomerge_sdk.cli import main
from evomerge_sdk.demo import (
    EVO,
    DemoConfig,
    describe_search,
    document_without_timing,
    format_table,
    load_result,
    run_demo,
)
from evomerge_sdk.engine import preset
from evomerge_sdk.errors import ConfigError

ROWS = [EVO, "best single adapter", "uniform", "Task Arithmetic", "TIES", "DARE", "LoRAHub-style"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh repository cache, as in CI: the first run builds the repository, the second loads it."""
    return tmp_path_factory.mktemp("repository-cache")


@pytest.fixture(scope="module")
def cli_run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, Path]]:
    out = tmp_path_factory.mktemp("cli") / "evomerge-out"
    saved = structlog.get_config()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOMERGE_CACHE_DIR", str(cache_dir))
        import io
        import sys

        buffer = io.StringIO()
        mp.setattr(sys, "stdout", buffer)
        status = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    structlog.configure(**saved)
    yield status, buffer.getvalue(), out


def test_cli_quick_demo_writes_the_table_the_json_and_the_png(cli_run: tuple[int, str, Path]) -> None:
    status, stdout, out = cli_run
    assert status == 0
    for row in ROWS:
        assert row in stdout
    # The verdict is a win only when this case's own paired interval says so; otherwise a tie.
    assert "test accuracy (" in stdout and "points over 1000 test prompts" in stdout
    assert f"{EVO}: one-stage search (default preset), sized to the same spend, seed 0" in stdout
    result = load_result(out / "result.json")
    assert [r["name"] for r in result["rows"]] == ROWS
    assert result["seed"] == 0 and result["config"]["quick"] is True
    assert result["target"]["kind"] == "ood" and result["target"]["specialist_in_pool"] is False
    evo = result["rows"][0]
    assert len(evo["alpha"]) == len(evo["beta"]) == len(result["pool"]) == 20
    assert evo["queries"] > 0 and evo["tokens"] <= result["spend"]["budget_tokens_per_search"]
    assert {r["name"] for r in result["rows"] if r["whitebox"]} == {"TIES", "DARE"}
    png = (out / "convergence.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert (out / result["materialized"]).exists()
    verdict = result["verdict"]
    assert verdict["outcome"] in ("win", "tie", "behind") and verdict["test_prompts"] == 1000
    low, high = verdict["ci95_points"]
    assert low <= verdict["difference_points"] <= high
    assert result["evo_merging_beats_every_row"] == (verdict["outcome"] == "win")
    if verdict["outcome"] == "tie":
        assert "This case is a tie" in stdout and "over 20 cases" in stdout
    assert len(evo["correct"]) == 1000 and set(evo["correct"]) <= {"0", "1"}
    assert evo["correct"].count("1") == round(1000 * evo["test"]["accuracy"])
    assert f"World fingerprint {result['world_fingerprint']}" in stdout


def test_the_progress_line_names_the_search_it_runs() -> None:
    assert describe_search(preset("paper")) == "two-stage search (paper preset)"
    assert describe_search(preset("default/no_denoising")) == "one-stage search (default/no_denoising preset)"


def test_quick_demo_is_deterministic(cli_run: tuple[int, str, Path], cache_dir: Path, tmp_path: Path) -> None:
    _, _, first_out = cli_run
    second = run_demo(DemoConfig(quick=True, out_dir=tmp_path / "second", cache_dir=cache_dir))
    first = load_result(first_out / "result.json")
    written = json.loads((tmp_path / "second" / "result.json").read_text())
    assert document_without_timing(written) == document_without_timing(first)
    assert document_without_timing(dict(second.document)) == document_without_timing(first)
    table = format_table(second.rows)
    assert table.count("\n") == len(ROWS) + 1 and "LoRAHub-style" in table
    # every service row's spend was counted by its own scheduler: the baselines are small and exact
    rows: dict[str, Any] = {r["name"]: r for r in first["rows"]}
    assert rows["uniform"]["queries"] == 1 and rows["best single adapter"]["queries"] == 20
    assert rows["uniform"]["tokens"] * 20 == rows["best single adapter"]["tokens"]
    # The two search rows compare at equal cost: 300 validation passes each in quick mode.
    hub, evo = rows["LoRAHub-style"], rows["Evo-Merging"]
    assert hub["queries"] == first["config"]["search_evaluations"] == 300
    assert hub["tokens"] == 300 * rows["uniform"]["tokens"]
    assert 0.95 * hub["tokens"] < evo["tokens"] < 1.02 * hub["tokens"]
    assert evo["queries"] > 5 * hub["queries"]  # minibatches: many more, smaller evaluations


def test_bad_demo_settings_fail_clearly(cache_dir: Path, tmp_path: Path, restore_logging: None) -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        DemoConfig(preset="nope")
    with pytest.raises(ConfigError, match="pool_size"):
        DemoConfig(pool_size=0)
    with pytest.raises(ConfigError, match="unknown target"):
        run_demo(DemoConfig(quick=True, target="ood:none/such", out_dir=tmp_path, cache_dir=cache_dir))
