"""The merge of DESIGN 1.1 on the embedded repository, against dense reference computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge_sdk.engine import keep_count, merge_lora, sparsify
from evomerge_sdk.errors import ConfigError
from evomerge_sdk.local.merge import keep_counts_vector
from evomerge_sdk.local.model import ModelWeights, forward_logits, log_softmax
from evomerge_sdk.local.repository import Repository


def reference_merge(
    repo: Repository, names: list[str], alpha: np.ndarray, beta: np.ndarray
) -> list[np.ndarray]:
    """W_k = W0_k + s * B_m @ A_m with A_m, B_m summed adapter by adapter with the engine's sparsify."""
    out = []
    for k, w0 in enumerate(repo.base.matrices()):
        a_m = np.zeros_like(repo.lora(names[0]).a[k])
        b_m = np.zeros_like(repo.lora(names[0]).b[k])
        for name, keep, scale in zip(names, alpha, beta, strict=True):
            lora = repo.lora(name)
            a_m += scale * sparsify(lora.a[k], keep)
            b_m += scale * lora.b[k]
        out.append(w0 + repo.config.scale * (b_m @ a_m))
    return out


def reference_logits(weights: ModelWeights, token_lists: list[list[int]]) -> np.ndarray:
    """The forward pass one prompt at a time, in float64."""
    rows = []
    for tokens in token_lists:
        e = weights.embedding[tokens].mean(axis=0)
        h1 = np.maximum(weights.w1 @ e + weights.b1, 0)
        h2 = np.maximum(weights.w2 @ h1 + weights.b2, 0)
        rows.append(weights.w3 @ h2 + weights.b3)
    return np.array(rows)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_pool_merger_equals_dense_reference(repo: Repository, data: st.DataObject) -> None:
    names = list(repo.adapter_names[:6])
    alpha = np.array(data.draw(st.lists(st.floats(0, 1), min_size=6, max_size=6)))
    beta = np.array(data.draw(st.lists(st.floats(-1.5, 1.5), min_size=6, max_size=6)))
    merged = repo.merger(names).merge(alpha, beta)
    for got, want in zip(merged.matrices(), reference_merge(repo, names, alpha, beta), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert merged.b1 is repo.base.b1 and merged.embedding is repo.base.embedding


def test_merged_pairs_equal_the_engine_merge_lora(repo: Repository) -> None:
    names = list(repo.adapter_names[2:9])
    rng = np.random.default_rng(3)
    alpha, beta = rng.random(len(names)), rng.normal(0, 0.5, len(names))
    pairs = repo.merger(names).merged_pairs(alpha, beta)
    for k, (a_m, b_m) in enumerate(pairs):
        loras = [repo.lora(n) for n in names]
        want_a, want_b = merge_lora([x.a[k] for x in loras], [x.b[k] for x in loras], alpha, beta)
        np.testing.assert_allclose(a_m, want_a, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b_m, want_b, rtol=1e-12, atol=1e-14)


def test_alpha_one_and_one_hot_beta_is_exactly_that_adapter(repo: Repository) -> None:
    names = list(repo.adapter_names)
    merger = repo.merger(names)
    target = repo.targets()[0]
    for i in (0, 5, len(names) - 1):
        beta = np.zeros(len(names))
        beta[i] = 1.0
        merged = merger.merge(np.ones(len(names)), beta)
        single = repo.single(names[i])
        for got, want in zip(merged.matrices(), single.matrices(), strict=True):
            np.testing.assert_array_equal(got, want)
        assert repo.evaluate(merged, target.validation) == repo.evaluate(single, target.validation)


def test_zero_alpha_or_zero_beta_leaves_the_base(repo: Repository) -> None:
    names = list(repo.adapter_names[:4])
    merger = repo.merger(names)
    for alpha, beta in ((np.zeros(4), np.ones(4)), (np.ones(4), np.zeros(4))):
        for got, want in zip(merger.merge(alpha, beta).matrices(), repo.base.matrices(), strict=True):
            np.testing.assert_array_equal(got, want)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=30), st.integers(1, 5000))
def test_vector_keep_counts_match_the_scalar_operator(alpha: list[float], size: int) -> None:
    got = keep_counts_vector(np.array(alpha), size)
    assert got.tolist() == [keep_count(a, size) for a in alpha]


def test_forward_pass_matches_a_per_prompt_reference(repo: Repository) -> None:
    names = list(repo.adapter_names[:5])
    weights = repo.merge(names, np.full(5, 0.6), np.array([0.5, -0.3, 0.2, 0.0, 1.0]))
    prompts = ["ner: ?", repo.targets()[0].validation.prompts[0], "completely unknown words"]
    ids, lengths = repo.encode(prompts)
    got = forward_logits(weights, ids, lengths)
    want = reference_logits(weights, [list(row[:k]) for row, k in zip(ids, lengths, strict=True)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    logprobs = repo.next_token_logprobs(weights, prompts)
    np.testing.assert_allclose(np.exp(logprobs).sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(logprobs, log_softmax(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("alpha", "beta", "match"),
    [
        ([1.0, 1.0], [0.5, 0.5, 0.5], "3 entries"),
        ([1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5], "3 entries"),
        ([1.0, np.nan, 1.0], [0.5, 0.5, 0.5], "finite"),
        ([1.0, 1.0, 1.0], [0.5, np.inf, 0.5], "finite"),
        ([1.0, 1.2, 1.0], [0.5, 0.5, 0.5], r"\[0, 1\]"),
        ([1.0, -0.1, 1.0], [0.5, 0.5, 0.5], r"\[0, 1\]"),
        (["a", 1.0, 1.0], [0.5, 0.5, 0.5], "numeric"),
    ],
)
def test_bad_coefficients_are_refused(repo: Repository, alpha: list, beta: list, match: str) -> None:
    merger = repo.merger(list(repo.adapter_names[:3]))
    with pytest.raises(ConfigError, match=match):
        merger.merge(alpha, beta)


def test_bad_pools_are_refused(repo: Repository) -> None:
    with pytest.raises(ConfigError, match="unknown adapter"):
        repo.merger(["ner/news", "no-such-adapter"])
    with pytest.raises(ConfigError, match="twice"):
        repo.merger(["ner/news", "ner/news"])
    with pytest.raises(ConfigError, match="non-empty"):
        repo.merger([])
    with pytest.raises(ConfigError, match="non-empty"):
        repo.merger("ner/news")
