"""The project's one metrics module: cross-entropy, accuracy and macro-F1, on option scores and on labels.

Output-space objectives score option scores (`cross_entropy`, `accuracy`, `macro_f1`, all taking
`(scores, labels)`); the embedded service scores next-token log-probabilities (`score_logprobs`). Both
count macro-F1 the same way (`label_macro_f1`), so every table of the project agrees.

For the embedded service, the loss is what the merge service reports (DESIGN 1.1): the mean
cross-entropy of the gold answer token under the full next-token distribution. Accuracy and macro-F1
read the model's answer as its most likely token *within the finite answer set* (constrained decoding,
as when an LLM is scored on options).
"""

from __future__ import annotations

import math

import attrs
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._types import FloatArray, IntArray
from ..errors import ConfigError

__all__ = [
    "Metrics",
    "accuracy",
    "cross_entropy",
    "label_macro_f1",
    "log_softmax",
    "macro_f1",
    "score_logprobs",
]


@attrs.frozen
class Metrics:
    """Mean cross-entropy (nats), accuracy and macro-F1 of a model on `n` examples."""

    loss: float
    accuracy: float
    macro_f1: float
    n: int


def label_macro_f1(gold: IntArray, predicted: IntArray) -> float:
    """Unweighted mean F1 over the classes that occur in gold or predicted (0 for a class never hit)."""
    gold = np.asarray(gold)
    predicted = np.asarray(predicted)
    if gold.shape != predicted.shape or gold.ndim != 1 or gold.size == 0:
        raise ConfigError(
            f"gold and predicted must be equal-length non-empty vectors, got {gold.shape}, {predicted.shape}"
        )
    classes = np.union1d(gold, predicted)
    g = gold[:, None] == classes[None, :]
    p = predicted[:, None] == classes[None, :]
    tp = (g & p).sum(0)
    denominator = g.sum(0) + p.sum(0)
    return float(np.mean(2.0 * tp / denominator))


def score_logprobs(logprobs: NDArray[np.floating], labels: IntArray, answer_ids: IntArray) -> Metrics:
    """Metrics from next-token log-probabilities (prompts x vocabulary) and gold answer token ids."""
    n = labels.shape[0]
    if logprobs.ndim != 2 or logprobs.shape[0] != n:
        raise ConfigError(f"logprobs must be ({n}, vocabulary), got {logprobs.shape}")
    loss = float(-logprobs[np.arange(n), labels].astype(np.float64).mean())
    predicted = answer_ids[np.argmax(logprobs[:, answer_ids], axis=1)]
    return Metrics(
        loss=loss,
        accuracy=float(np.mean(predicted == labels)),
        macro_f1=label_macro_f1(labels, predicted),
        n=int(n),
    )


# -- on option scores -------------------------------------------------------------------------------------
def log_softmax(scores: ArrayLike) -> FloatArray:
    """Scores renormalised over the answer set (last axis): log-probabilities that sum to one."""
    z = np.asarray(scores, dtype=np.float64)
    out: FloatArray = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    return out


def cross_entropy(scores: ArrayLike, labels: ArrayLike) -> float:
    """Mean cross-entropy (nats) of the gold options under the scores renormalised over the options."""
    ls = log_softmax(scores)
    y = np.asarray(labels, dtype=np.int64)
    value = float(-ls[np.arange(y.size), y].mean())
    return value if math.isfinite(value) else math.inf


def accuracy(scores: ArrayLike, labels: ArrayLike) -> float:
    """Share of examples whose highest-scoring option is the gold one."""
    z = np.asarray(scores, dtype=np.float64)
    return float(np.mean(np.argmax(z, axis=-1) == np.asarray(labels)))


def macro_f1(scores: ArrayLike, labels: ArrayLike) -> float:
    """Macro-F1 of the highest-scoring options (classes that occur in gold or predicted)."""
    z = np.asarray(scores, dtype=np.float64)
    return label_macro_f1(np.asarray(labels, dtype=np.int64), np.argmax(z, axis=-1).astype(np.int64))
