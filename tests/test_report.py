"""Any search result as a convergence PNG and a Markdown table (`evomerge_sdk.report`)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from evomerge_sdk import DEFAULT, ConfigError, EvoMerge, markdown_table, uniform_merge, write_convergence_png
from evomerge_sdk.testing import SyntheticPool


def test_a_search_and_a_baseline_become_a_png_and_a_table(tmp_path: Path) -> None:
    pool = SyntheticPool(6, seed=1)
    evo = anyio.run(EvoMerge(pool, 6, DEFAULT).run)
    flat = anyio.run(uniform_merge, pool, 6)
    results = {"Evo-Merging": evo, "uniform": flat}
    path = write_convergence_png(results, tmp_path / "convergence.png", title="synthetic pool")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(results).splitlines()
    assert table[0].startswith("| search | validation loss") and len(table) == 4
    assert table[2].startswith(f"| Evo-Merging | {evo.loss:.4f} |") and f"| {evo.evaluations:,} |" in table[2]
    with pytest.raises(ConfigError, match="directory"):
        write_convergence_png(results, tmp_path)
    with pytest.raises(ConfigError, match="SearchResult"):
        markdown_table({"x": 1})  # type: ignore[dict-item]
