"""Any search's result as a picture and a table: `write_convergence_png` and `markdown_table`.

A search result carries its history (the incumbent's loss after every generation), which is what a
reader wants to see: how fast each search converged and where it ended. The PNG needs matplotlib (the
`cli` extra); the table needs nothing.

    results = {"Evo-Merging": evo, "LoRAHub-style": hub}
    write_convergence_png(results, "convergence.png")
    print(markdown_table(results))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path

from .engine import SearchResult
from .errors import CLI_EXTRA_HINT, ConfigError

__all__ = ["markdown_table", "write_convergence_png"]


def _checked(results: Mapping[str, SearchResult]) -> Mapping[str, SearchResult]:
    if not isinstance(results, Mapping) or not results:
        raise ConfigError("results must be a non-empty mapping of a name to a SearchResult")
    for name, result in results.items():
        if not isinstance(name, str) or not isinstance(result, SearchResult):
            raise ConfigError(f"results[{name!r:.40}] must be a SearchResult, got {type(result).__name__}")
    return results


def write_convergence_png(
    results: Mapping[str, SearchResult], path: str | Path, *, title: str | None = None
) -> Path:
    """Each search's best validation loss against the evaluations it ran (a step per generation, stage
    boundaries dotted), as a PNG at `path`; a result with fewer than two generations (a baseline such as
    the best single model) is a horizontal line at its loss."""
    _checked(results)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(f"the convergence plot needs matplotlib: {CLI_EXTRA_HINT}") from exc
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; give a file name for the plot")
    fig = Figure(figsize=(7.5, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lines = []
    for name, result in results.items():
        points = [p for p in result.history if math.isfinite(p.best_loss)]
        if len(points) < 2:  # a baseline: one value, drawn across
            lines.append((name, result))
            continue
        xs = [p.evaluations for p in points]
        (drawn,) = ax.step(xs, [p.best_loss for p in points], where="post", linewidth=1.8, label=name)
        for before, after in itertools.pairwise(points):
            if before.stage != after.stage:
                ax.axvline(before.evaluations, color=drawn.get_color(), linestyle=":", linewidth=1)
    for (name, result), style in zip(lines, ("--", "-.", ":", (0, (5, 1))) * len(lines), strict=False):
        ax.axhline(result.loss, color="gray", linestyle=style, linewidth=1, label=name)
    ax.set_xlabel("evaluations (candidates scored on the validation split or a minibatch of it)")
    ax.set_ylabel("best validation loss")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(str(out), format="png")
    except OSError as exc:
        raise ConfigError(f"cannot write the plot {out}: {exc.strerror or exc}") from None
    return out


def markdown_table(results: Mapping[str, SearchResult]) -> str:
    """One row per result: validation loss, held-out loss, evaluations, generations, why it stopped."""
    _checked(results)
    lines = [
        "| search | validation loss | held-out loss | evaluations | generations | stopped |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in results.items():
        held = "" if r.held_out_loss is None else f"{r.held_out_loss:.4f}"
        generations = r.history[-1].generation if r.history else 0
        stop = r.stop_reason.value
        lines.append(f"| {name} | {r.loss:.4f} | {held} | {r.evaluations:,} | {generations:,} | {stop} |")
    return "\n".join(lines)
