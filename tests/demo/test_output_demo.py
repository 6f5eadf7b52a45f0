"""`evomerge demo --mode output` end to end on the small repository: the spend table shows the search sent
no query after the scoring pass, result.json carries the merged model, and a re-run with a response
cache sends nothing at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from evomerge_sdk.cli import build_parser
from evomerge_sdk.cli._demo import _print_output_demo
from evomerge_sdk.demo import BEST_SINGLE, EVO, OutputDemoConfig, format_spend, run_output_demo
from evomerge_sdk.errors import ConfigError
from evomerge_sdk.merged import load_spec


def test_output_demo_searches_on_cached_scores_and_writes_a_servable_result(tmp_path: Path) -> None:
    config = OutputDemoConfig(
        quick=True,
        small_repository=True,
        pool_size=6,
        out_dir=tmp_path / "out",
        response_cache=tmp_path / "cache.sqlite",
    )
    result = run_output_demo(config)
    scoring, search, baselines, test = result.spend
    assert scoring.queries == 7 * (60 + 20)  # 6 adapters + base, validation + held-out, one request each
    assert search.queries == 0 and search.tokens == 0
    assert baselines.queries == 0
    assert test.queries == 7 * 100
    assert result.evo.evaluations > 100
    names = [r.name for r in result.rows]
    assert names[0] == EVO and BEST_SINGLE in names and "Evo-Merging, pruned" in names
    pruned = result.row("Evo-Merging, pruned")
    assert pruned.validation_loss <= result.row(EVO).validation_loss * 1.005 + 1e-12
    assert len(spec_active := result.spec.active) <= len(result.pool) and spec_active
    doc = json.loads(result.result_path.read_text())
    assert doc["spend"][1]["queries"] == 0
    spec = load_spec(result.result_path)
    assert spec.mode == "output" and spec.reference == "base"
    assert list(spec.alpha) == list(pruned.alpha or ())
    assert "| search (" in format_spend(result.spend)
    # what `evomerge demo --mode output` prints for this result
    console = Console(record=True, width=120)
    _print_output_demo(console, result)
    printed = console.export_text()
    assert "output space: " in printed and "(quick)" in printed and "spend by phase" in printed
    assert all(r.name in printed for r in result.rows) and f"{100 * pruned.test_accuracy:.1f}" in printed
    assert "the best single adapter on test accuracy" in printed and str(result.result_path) in printed
    # a re-run answers every request from the response cache: nothing is sent
    again = run_output_demo(config)
    assert sum(s.queries for s in again.spend) == 0
    assert again.spend[0].cache_hits == scoring.queries
    assert [r.test_accuracy for r in again.rows] == [r.test_accuracy for r in result.rows]


def test_cli_has_the_output_mode_and_serve() -> None:
    args = build_parser().parse_args(["demo", "--mode", "output", "--quick", "--reference", "mean"])
    assert (args.mode, args.reference, args.quick) == ("output", "mean", True)
    args = build_parser().parse_args(["serve", "result.json", "--port", "0"])
    assert (args.result, args.port, args.host) == ("result.json", 0, "127.0.0.1")
    with pytest.raises(ConfigError):
        OutputDemoConfig(reference="median")
