"""evomerge-sdk: black-box merging of LLMs reachable only through APIs (Evo-Merging).

The package root re-exports the product surface only: providers, errors, the `Scheduler`, the engine's
search, the merge-service client, the objectives and the merged model. The embedded service lives in
`evomerge_sdk.local`, the demo in `evomerge_sdk.demo`, test doubles in `evomerge_sdk.testing`. Heavy parts
(numpy, aiohttp) load on first use, so `import evomerge_sdk` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names
from .errors import (
    AuthenticationError,
    BadResponse,
    BudgetExceeded,
    ConfigError,
    ConnectionFailed,
    CoordinationLost,
    EvomergeError,
    InvalidRequest,
    ProviderError,
    RateLimited,
    RequestTimeout,
    RetryableError,
    ServerError,
    StorageError,
    UsageError,
    deprecated_alias,
)
from .providers import (
    ChatRequest,
    Completion,
    Message,
    Provider,
    RateLimitInfo,
    TokenLogprob,
    Usage,
    available_providers,
    load_provider,
)

__version__ = "0.1.0"

# name -> submodule that defines it; imported on first attribute access.
_ENGINE = (
    "DEFAULT",
    "PAPER",
    "Candidate",
    "EarlyStopping",
    "EvaluationContext",
    "EvoMerge",
    "Objective",
    "Progress",
    "SearchConfig",
    "SearchResult",
    "Split",
    "StageConfig",
    "StopReason",
    "ablations",
    "best_single",
    "fit_to_queries",
    "lorahub",
    "planned_queries",
    "preset",
    "random_search",
    "task_arithmetic",
    "uniform_merge",
)
_SCHEDULER = ("Budget", "Price", "PriceTable", "RedisCoordination", "RetryPolicy", "Scheduler")
_SERVICE = ("MergeServiceClient", "ServiceSession")
_MERGED = ("MergedModel", "MergedModelServer", "MergedSpec", "load_spec", "open_merged")
_OBJECTIVES = (
    "AnswerSet",
    "LabelledExamples",
    "OutputScores",
    "OutputSpaceObjective",
    "ScoreTable",
    "ScoringConfig",
    "ScoringProgress",
    "ServiceObjective",
    "collect_scores",
    "plan_scoring",
)
_REPORT = ("markdown_table", "write_convergence_png")
_LAZY: dict[str, str] = {
    **dict.fromkeys(_ENGINE, ".engine"),
    **dict.fromkeys(_SCHEDULER, ".scheduler"),
    **dict.fromkeys(_SERVICE, ".service"),
    **dict.fromkeys(_MERGED, ".merged"),
    **dict.fromkeys(_OBJECTIVES, ".objectives"),
    **dict.fromkeys(_REPORT, ".report"),
}

if TYPE_CHECKING:
    from .engine import (
        DEFAULT,
        PAPER,
        Candidate,
        EarlyStopping,
        EvaluationContext,
        EvoMerge,
        Objective,
        Progress,
        SearchConfig,
        SearchResult,
        Split,
        StageConfig,
        StopReason,
        ablations,
        best_single,
        fit_to_queries,
        lorahub,
        planned_queries,
        preset,
        random_search,
        task_arithmetic,
        uniform_merge,
    )
    from .merged import MergedModel, MergedModelServer, MergedSpec, load_spec, open_merged
    from .objectives import (
        AnswerSet,
        LabelledExamples,
        OutputScores,
        OutputSpaceObjective,
        ScoreTable,
        ScoringConfig,
        ScoringProgress,
        ServiceObjective,
        collect_scores,
        plan_scoring,
    )
    from .report import markdown_table, write_convergence_png
    from .scheduler import Budget, Price, PriceTable, RedisCoordination, RetryPolicy, Scheduler
    from .service import MergeServiceClient, ServiceSession


__getattr__, __dir__ = lazy_names(
    __name__, _LAZY, globals(), missing=lambda name: deprecated_alias(__name__, name, stacklevel=4)
)


__all__ = [
    "DEFAULT",
    "PAPER",
    "AnswerSet",
    "AuthenticationError",
    "BadResponse",
    "Budget",
    "BudgetExceeded",
    "Candidate",
    "ChatRequest",
    "Completion",
    "ConfigError",
    "ConnectionFailed",
    "CoordinationLost",
    "EarlyStopping",
    "EvaluationContext",
    "EvoMerge",
    "EvomergeError",
    "InvalidRequest",
    "LabelledExamples",
    "MergeServiceClient",
    "MergedModel",
    "MergedModelServer",
    "MergedSpec",
    "Message",
    "Objective",
    "OutputScores",
    "OutputSpaceObjective",
    "Price",
    "PriceTable",
    "Progress",
    "Provider",
    "ProviderError",
    "RateLimitInfo",
    "RateLimited",
    "RedisCoordination",
    "RequestTimeout",
    "RetryPolicy",
    "RetryableError",
    "Scheduler",
    "ScoreTable",
    "ScoringConfig",
    "ScoringProgress",
    "SearchConfig",
    "SearchResult",
    "ServerError",
    "ServiceObjective",
    "ServiceSession",
    "Split",
    "StageConfig",
    "StopReason",
    "StorageError",
    "TokenLogprob",
    "Usage",
    "UsageError",
    "ablations",
    "available_providers",
    "best_single",
    "collect_scores",
    "fit_to_queries",
    "load_provider",
    "load_spec",
    "lorahub",
    "markdown_table",
    "open_merged",
    "plan_scoring",
    "planned_queries",
    "preset",
    "random_search",
    "task_arithmetic",
    "uniform_merge",
    "write_convergence_png",
]
