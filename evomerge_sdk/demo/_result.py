"""The provider-mode demo's result: its rows, `result.json` format, its Markdown table and its plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ..errors import CLI_EXTRA_HINT, ConfigError

if TYPE_CHECKING:
    from ._provider import DemoConfig

__all__ = [
    "EVO",
    "LORAHUB_ROW",
    "MULTI_CASE",
    "RESULT_FORMAT",
    "CurvePoint",
    "DemoRow",
    "Verdict",
    "document_without_timing",
    "format_table",
    "judge",
    "load_result",
    "verdict",
    "write_plot",
]

RESULT_FORMAT = "evomerge-sdk/demo-result"
EVO = "Evo-Merging"
LORAHUB_ROW = "LoRAHub-style"


@attrs.frozen
class CurvePoint:
    """One generation of a search, for the convergence plot: its stage, the validation examples scored so
    far and the best validation loss so far."""

    stage: str
    examples_scored: int
    best_loss: float


@attrs.frozen
class DemoRow:
    """One method of the comparison: its merge, test and validation scores, and what it spent."""

    name: str
    test_accuracy: float
    test_macro_f1: float
    test_loss: float
    validation_loss: float
    queries: int
    tokens: int
    whitebox: bool = False
    alpha: tuple[float, ...] | None = None
    beta: tuple[float, ...] | None = None
    params: Mapping[str, float] = attrs.field(factory=dict)
    cache_hits: int = 0
    stop_reason: str | None = None
    correct: str | None = None
    """Per test prompt, in order, "1" where the row's answer is right and "0" where it is wrong: what the
    verdict pairs rows on."""

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON dict."""
        return {
            "name": self.name,
            "test": {
                "accuracy": self.test_accuracy,
                "macro_f1": self.test_macro_f1,
                "loss": self.test_loss if math.isfinite(self.test_loss) else None,
            },
            "validation_loss": self.validation_loss if math.isfinite(self.validation_loss) else None,
            "queries": self.queries,
            "tokens": self.tokens,
            "cache_hits": self.cache_hits,
            "whitebox": self.whitebox,
            "alpha": None if self.alpha is None else list(self.alpha),
            "beta": None if self.beta is None else list(self.beta),
            "params": dict(self.params),
            "stop_reason": self.stop_reason,
            "correct": self.correct,
        }


MULTI_CASE = (
    "over 20 cases (5 seeds x 4 out-of-domain targets, pool 20, `python benchmarks/quality.py`), "
    "Evo-Merging at LoRAHub-style's spend minus LoRAHub-style is +2.6 points of test accuracy, 95% "
    "interval [+1.4, +3.9], ahead in 17 of 20"
)
"""What one case cannot say: the multi-case result the demo quotes for a tie (benchmarks/RESULTS.md)."""


@attrs.frozen
class Verdict:
    """Evo-Merging against the strongest other row of one case, paired over its test prompts.

    `outcome` is "win" only when the 95% interval of Evo-Merging minus *every* other row lies above zero,
    "behind" when the interval against the strongest row lies below zero, and "tie" otherwise (also
    when the rows carry no per-prompt results to pair). Differences and intervals are in points.
    """

    outcome: str
    rival: str
    difference: float
    low: float
    high: float
    prompts: int

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON dict."""
        finite = math.isfinite(self.low) and math.isfinite(self.high)
        return {
            "outcome": self.outcome,
            "rival": self.rival,
            "difference_points": round(self.difference, 2),
            "ci95_points": [round(self.low, 2), round(self.high, 2)] if finite else None,
            "test_prompts": self.prompts,
        }


def paired_interval(mine: str, theirs: str) -> tuple[float, float, float]:
    """Mean and 95% interval (normal, over prompts) of the per-prompt accuracy difference, in points."""
    if len(mine) != len(theirs) or not mine:
        return math.nan, -math.inf, math.inf
    diffs = [int(a) - int(b) for a, b in zip(mine, theirs, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else math.inf
    half = 1.96 * math.sqrt(var / n)
    return 100 * mean, 100 * (mean - half), 100 * (mean + half)


def judge(rows: Sequence[DemoRow]) -> Verdict:
    """Evo-Merging's verdict on this case (see `Verdict`): a single case claims a win only when its own
    paired interval supports it; its ranking is otherwise noise, and differs between CPUs."""
    evo = next(r for r in rows if r.name == EVO)
    others = [r for r in rows if r.name != EVO]
    rival = max(others, key=lambda r: r.test_accuracy)
    intervals = {r.name: paired_interval(evo.correct or "", r.correct or "") for r in others}
    diff, low, high = intervals[rival.name]
    if not math.isfinite(diff):  # nothing to pair: report the raw difference and call it a tie
        diff = 100 * (evo.test_accuracy - rival.test_accuracy)
    if all(lo > 0 for _, lo, _ in intervals.values()):
        outcome = "win"
    elif high < 0:
        outcome = "behind"
    else:
        outcome = "tie"
    return Verdict(outcome, rival.name, diff, low, high, len(evo.correct or ""))


def verdict(rows: Sequence[DemoRow], multi_case: str = "") -> str:
    """The demo's verdict in words: a win or a loss only when this case's paired interval excludes zero;
    otherwise a tie, with the multi-case result quoted (`multi_case`, default `MULTI_CASE`)."""
    v = judge(rows)
    evo = next(r for r in rows if r.name == EVO)
    rival = next(r for r in rows if r.name == v.rival)
    scores = f"{100 * evo.test_accuracy:.1f} vs {100 * rival.test_accuracy:.1f} test accuracy ({v.rival})"
    interval = (
        f"paired 95% interval of the difference [{v.low:+.1f}, {v.high:+.1f}] points over {v.prompts} "
        "test prompts"
        if math.isfinite(v.low) and math.isfinite(v.high)
        else "no per-prompt results to pair"
    )
    if v.outcome == "win":
        return f"{EVO} beats every other row in this case: {scores}; {interval}, above zero against each."
    if v.outcome == "behind":
        return f"{EVO} is behind {v.rival} in this case: {scores}; {interval}, below zero."
    return (
        f"This case is a tie: {EVO} {scores}, {v.difference:+.1f} points; {interval} holds zero. One case "
        f"cannot rank them (and single-case numbers differ between CPUs); {multi_case or MULTI_CASE}."
    )


def format_table(rows: Sequence[DemoRow]) -> str:
    """The comparison as a plain-text (Markdown) table."""
    lines = [
        "| method | test accuracy | test macro-F1 | validation loss | queries | tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    best = max(r.test_accuracy for r in rows)
    for r in rows:
        mark = " *" if r.test_accuracy == best else ""
        name = r.name + (" (white-box)" if r.whitebox and "white-box" not in r.name else "")
        lines.append(
            f"| {name}{mark} | {100 * r.test_accuracy:.1f} | {100 * r.test_macro_f1:.1f} | "
            f"{r.validation_loss:.4f} | {r.queries:,} | {r.tokens:,} |"
        )
    return "\n".join(lines)


def write_plot(
    path: Path,
    curves: Mapping[str, Sequence[CurvePoint]],
    rows: Sequence[DemoRow],
    target: str,
    config: DemoConfig,
) -> None:
    """The convergence plot (PNG): each search's best validation loss against the examples it scored."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(f"the convergence plot needs matplotlib: {CLI_EXTRA_HINT}") from exc
    fig = Figure(figsize=(7.5, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # Examples scored, not queries, on the x axis: a minibatch query scores a tenth of what a full pass
    # does, so against queries the search that spent the same would look ten times as costly.
    spend = {r.name: f"{r.name}: {r.queries:,} queries, {r.tokens:,} tokens" for r in rows}
    for name, color in ((EVO, "tab:red"), (LORAHUB_ROW, "tab:blue")):
        curve = curves.get(name, ())
        xs = [p.examples_scored for p in curve]
        ys = [p.best_loss for p in curve]
        ax.step(xs, ys, where="post", label=spend.get(name, name), color=color, linewidth=1.8)
    evo = curves.get(EVO, ())
    denoise = [p for p in evo if p.stage == "denoise"]
    if denoise and len(denoise) < len(evo):
        boundary = denoise[-1].examples_scored
        ax.axvline(boundary, color="tab:red", linestyle=":", linewidth=1)
        ax.annotate(" stage 2", (boundary, ax.get_ylim()[1]), fontsize=8, va="top")
    for r, style in zip(
        (r for r in rows if r.name in ("best single adapter", "Task Arithmetic")), ("--", "-."), strict=False
    ):
        ax.axhline(r.validation_loss, color="gray", linestyle=style, linewidth=1, label=r.name)
    ax.set_xlabel("validation examples scored (the service's cost; one full pass scores the whole split)")
    ax.set_ylabel("best validation loss")
    mode = "quick" if config.quick else "full"
    ax.set_title(f"{target}, pool {config.pool_size}, seed {config.seed} ({mode})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), format="png")


def document_without_timing(document: Mapping[str, Any]) -> dict[str, Any]:
    """The result document minus what legitimately differs between runs (timings)."""
    return {k: v for k, v in document.items() if k != "timing"}


def load_result(path: str | Path) -> dict[str, Any]:
    """A result.json written by the demo; ConfigError when it cannot be read or is something else."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        raise ConfigError(f"{path} is not an evomerge demo result")
    return data
