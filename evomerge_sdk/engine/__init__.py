"""The evolutionary engine: CMA-ES, the merge operators, the two-stage search and its baselines.

numpy only; nothing here touches the network. An objective (see `objective`) turns candidates into
losses, however it gets them.
"""

from __future__ import annotations

from ._baselines import (
    best_single,
    lorahub,
    random_search,
    task_arithmetic,
    task_arithmetic_grid,
    uniform_merge,
)
from ._cmaes import CMA, BoxTransform, StopCriteria, StopReason, default_popsize
from ._config import (
    DEFAULT,
    LORAHUB,
    PAPER,
    PRESETS,
    EarlyStopping,
    SearchConfig,
    Stage,
    StageConfig,
    ablations,
    preset,
)
from ._objective import Candidate, EvaluationContext, Objective, Split
from ._operators import keep_count, magnitude_order, merge_lora, merge_outputs, scale_sum, sparsify
from ._planning import fit_to_queries, planned_queries
from ._search import EvoMerge, HistoryPoint, Progress, ProgressCallback, SearchResult, StageResult

__all__ = [
    "CMA",
    "DEFAULT",
    "LORAHUB",
    "PAPER",
    "PRESETS",
    "BoxTransform",
    "Candidate",
    "EarlyStopping",
    "EvaluationContext",
    "EvoMerge",
    "HistoryPoint",
    "Objective",
    "Progress",
    "ProgressCallback",
    "SearchConfig",
    "SearchResult",
    "Split",
    "Stage",
    "StageConfig",
    "StageResult",
    "StopCriteria",
    "StopReason",
    "ablations",
    "best_single",
    "default_popsize",
    "fit_to_queries",
    "keep_count",
    "lorahub",
    "magnitude_order",
    "merge_lora",
    "merge_outputs",
    "planned_queries",
    "preset",
    "random_search",
    "scale_sum",
    "sparsify",
    "task_arithmetic",
    "task_arithmetic_grid",
    "uniform_merge",
]
