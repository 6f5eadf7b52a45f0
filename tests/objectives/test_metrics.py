"""Task metrics of the embedded repository against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge_sdk.errors import ConfigError
from evomerge_sdk.objectives import label_macro_f1, score_logprobs


def test_macro_f1_by_hand() -> None:
    gold = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    # class 0: tp 1, fp 1, fn 1 -> F1 0.5; class 1: tp 2, fp 1, fn 0 -> 0.8; class 2: tp 0 -> 0
    assert label_macro_f1(gold, predicted) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert label_macro_f1(gold, gold) == 1.0


def test_macro_f1_counts_classes_only_predicted() -> None:
    # class 9 never occurs in gold but is predicted once: it counts with F1 0
    assert label_macro_f1(np.array([1, 1]), np.array([1, 9])) == pytest.approx((2 / 3 + 0.0) / 2)


def test_score_logprobs_by_hand() -> None:
    # vocabulary of 5 tokens; the answer set is tokens 2 and 4
    probs = np.array(
        [
            [0.1, 0.1, 0.5, 0.1, 0.2],  # answers 2 (gold 2): right
            [0.6, 0.0, 0.1, 0.1, 0.2],  # answers 4 (gold 2): wrong, though token 0 is likeliest overall
            [0.1, 0.1, 0.1, 0.1, 0.6],  # answers 4 (gold 4): right
        ]
    )
    labels = np.array([2, 2, 4])
    with np.errstate(divide="ignore"):
        metrics = score_logprobs(np.log(probs), labels, np.array([2, 4]))
    assert metrics.loss == pytest.approx(-(math.log(0.5) + math.log(0.1) + math.log(0.6)) / 3)
    assert metrics.accuracy == pytest.approx(2 / 3)
    # class 2: tp 1, fn 1 -> F1 2/3; class 4: tp 1, fp 1 -> 2/3
    assert metrics.macro_f1 == pytest.approx(2 / 3)
    assert metrics.n == 3


def test_shape_errors() -> None:
    with pytest.raises(ConfigError):
        label_macro_f1(np.array([1, 2]), np.array([1]))
    with pytest.raises(ConfigError):
        label_macro_f1(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    with pytest.raises(ConfigError):
        score_logprobs(np.zeros((2, 5)), np.array([1, 2, 3]), np.array([1, 2, 3]))
