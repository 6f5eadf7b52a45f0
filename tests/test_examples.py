"""The examples the README points at run as written."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.anyio
async def test_service_search_example_runs_a_budgeted_search() -> None:
    loss = await _load("service_search").main(max_evaluations=80)
    assert math.isfinite(loss) and loss > 0


@pytest.mark.anyio
async def test_output_merge_example_scores_searches_builds_and_serves(tmp_path: Path) -> None:
    answer = await _load("output_merge").main(out=tmp_path / "output-merge")
    merged = (tmp_path / "output-merge" / "merged.json").read_text(encoding="utf-8")
    assert answer and f'"{answer}"' in merged  # an option of the saved merged model's answer set
