"""Fitness: what the search minimises.

* `output`: output-space merging (DESIGN 1.2): option scores collected once per model through the
  `Scheduler`, and `OutputSpaceObjective`, the search's objective over the cached scores;
* `service`: `ServiceObjective`, the search's objective over a merge service (DESIGN 1.1);
* `metrics`: the project's one metrics module (cross-entropy, accuracy, macro-F1).
"""

from __future__ import annotations

from .metrics import Metrics, accuracy, cross_entropy, label_macro_f1, log_softmax, macro_f1, score_logprobs
from .output import (
    MEAN_REFERENCE,
    AnswerSet,
    LabelledExamples,
    OutputScores,
    OutputSpaceObjective,
    Providers,
    ScoreTable,
    ScoringCallback,
    ScoringConfig,
    ScoringProgress,
    collect_scores,
    plan_scoring,
    provider_for,
    score_completion,
    scoring_request,
    vote_scores,
)
from .service import ServiceObjective

__all__ = [
    "MEAN_REFERENCE",
    "AnswerSet",
    "LabelledExamples",
    "Metrics",
    "OutputScores",
    "OutputSpaceObjective",
    "Providers",
    "ScoreTable",
    "ScoringCallback",
    "ScoringConfig",
    "ScoringProgress",
    "ServiceObjective",
    "accuracy",
    "collect_scores",
    "cross_entropy",
    "label_macro_f1",
    "log_softmax",
    "macro_f1",
    "plan_scoring",
    "provider_for",
    "score_completion",
    "score_logprobs",
    "scoring_request",
    "vote_scores",
]
