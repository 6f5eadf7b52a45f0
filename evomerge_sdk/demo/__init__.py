"""`evomerge demo`: Evo-Merging against its baselines on the embedded service, in both modes.

* provider mode (`run_demo`, `DemoConfig`): the service merges LoRA weights; rows, `result.json` and the
  convergence plot (`_result`);
* output mode (`run_output_demo`, `OutputDemoConfig`): the models' answer scores are merged, through the
  real OpenAI adapter on the embedded service's chat route.

A showcase and a test bed, not part of the SDK's product surface: product modules never import it.
"""

from __future__ import annotations

from ._output import (
    BASE,
    BEST_SINGLE,
    OUTPUT_RESULT_FORMAT,
    PRUNED,
    UNIFORM,
    OutputDemoConfig,
    OutputDemoResult,
    SpendRow,
    format_spend,
    labelled,
    run_output_demo,
    run_output_demo_async,
)
from ._provider import (
    DemoConfig,
    DemoResult,
    PlainReporter,
    Reporter,
    SilentReporter,
    describe_progress,
    describe_scoring,
    describe_search,
    pick_target,
    quick_search_config,
    run_demo,
    run_demo_async,
)
from ._result import (
    EVO,
    LORAHUB_ROW,
    MULTI_CASE,
    RESULT_FORMAT,
    CurvePoint,
    DemoRow,
    Verdict,
    document_without_timing,
    format_table,
    judge,
    load_result,
    verdict,
    write_plot,
)

__all__ = [
    "BASE",
    "BEST_SINGLE",
    "EVO",
    "LORAHUB_ROW",
    "MULTI_CASE",
    "OUTPUT_RESULT_FORMAT",
    "PRUNED",
    "RESULT_FORMAT",
    "UNIFORM",
    "CurvePoint",
    "DemoConfig",
    "DemoResult",
    "DemoRow",
    "OutputDemoConfig",
    "OutputDemoResult",
    "PlainReporter",
    "Reporter",
    "SilentReporter",
    "SpendRow",
    "Verdict",
    "describe_progress",
    "describe_scoring",
    "describe_search",
    "document_without_timing",
    "format_spend",
    "format_table",
    "judge",
    "labelled",
    "load_result",
    "pick_target",
    "quick_search_config",
    "run_demo",
    "run_demo_async",
    "run_output_demo",
    "run_output_demo_async",
    "verdict",
    "write_plot",
]
