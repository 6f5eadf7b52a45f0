"""Paired differences over cases: the mean, its 95% interval and wins out of cases (DESIGN 5).

Every quality claim of the benchmarks is one of these, paired by (seed, target): a single case is an
illustration, and its ranking can differ between CPUs. The interval is Student's t on the per-case
differences (cases are few, 3 seeds x 4 targets is 12), so it is honest about how little 12 cases say.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052,
         2.048, 2.045, 2.042)  # fmt: skip
"""The 97.5% quantile of Student's t for 1..30 degrees of freedom (numpy has no t distribution)."""


def t975(df: int) -> float:
    """The two-sided 95% t quantile for `df` degrees of freedom (normal-ish beyond 30)."""
    if df < 1:
        return math.inf
    if df <= len(_T975):
        return _T975[df - 1]
    return 2.021 if df <= 40 else 2.000 if df <= 60 else 1.980 if df <= 120 else 1.960


def paired(diffs: Sequence[float], digits: int = 2) -> dict[str, object]:
    """{"mean", "ci95": [low, high], "se", "wins", "cases"} of per-case differences (a - b; a win is > 0)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.inf
    half = t975(n - 1) * se
    low, high = (mean - half, mean + half) if math.isfinite(half) else (-math.inf, math.inf)
    return {
        "mean": round(mean, digits),
        "ci95": [round(low, digits), round(high, digits)] if math.isfinite(half) else None,
        "se": round(se, digits + 1) if math.isfinite(se) else None,
        "wins": sum(d > 0 for d in diffs),
        "cases": n,
    }


def describe(diff: dict[str, object], unit: str = "") -> str:
    """'+1.2 [-0.3, +2.7] (9 of 12)' for a table cell."""
    ci = diff["ci95"]
    interval = "[n/a]" if ci is None else f"[{ci[0]:+}, {ci[1]:+}]"  # type: ignore[index]
    return f"{diff['mean']:+}{unit} {interval} ({diff['wins']} of {diff['cases']})"
