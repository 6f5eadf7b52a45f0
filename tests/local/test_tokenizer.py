"""The embedded model's word-level tokenizer: round trips, unknown words, padding, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from evomerge_sdk.errors import ConfigError
from evomerge_sdk.local.tokenizer import PAD, QUERY, UNK, Tokenizer, pseudo_words

WORDS = pseudo_words(30, seed=7)
TOKENIZER = Tokenizer((PAD, UNK, QUERY, "ner:", "red", *WORDS))


def test_pseudo_words_are_distinct_reproducible_and_avoid_taken() -> None:
    a = pseudo_words(200, seed=1, taken=["bafa"])
    assert len(set(a)) == 200
    assert a == pseudo_words(200, seed=1, taken=["bafa"])
    assert "bafa" not in a
    assert a != pseudo_words(200, seed=2)


@given(st.lists(st.sampled_from(["ner:", "red", "?", *WORDS]), min_size=1, max_size=20))
def test_encode_decode_round_trip(words: list[str]) -> None:
    text = " ".join(words)
    ids = TOKENIZER.encode(text)
    assert ids.dtype == np.int64 and len(ids) == len(words)
    assert TOKENIZER.decode(ids) == text


def test_query_mark_splits_off_and_unknown_words_map_to_unk() -> None:
    ids = TOKENIZER.encode(f"ner: {WORDS[0]}? nonsenseword")
    assert ids.tolist() == [3, TOKENIZER.token_id(WORDS[0]), TOKENIZER.query_id, TOKENIZER.unk_id]
    assert TOKENIZER.decode(ids) == f"ner: {WORDS[0]} ? <unk>"


def test_encode_batch_pads_right_and_decode_drops_padding() -> None:
    ids, lengths = TOKENIZER.encode_batch(["ner: red ?", "red"])
    assert ids.shape == (2, 3) and lengths.tolist() == [3, 1]
    assert ids[1].tolist() == [TOKENIZER.token_id("red"), TOKENIZER.pad_id, TOKENIZER.pad_id]
    assert TOKENIZER.decode(ids[1]) == "red"


@pytest.mark.parametrize(
    "tokens",
    [
        ("<unk>", "<pad>", "?", "a"),  # wrong special order
        (PAD, UNK, QUERY, "a", "a"),  # duplicate
        (PAD, UNK, QUERY, "two words"),  # whitespace
        (PAD, UNK, QUERY, "why?"),  # '?' inside a token
    ],
)
def test_bad_vocabularies_are_refused(tokens: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        Tokenizer(tokens)


def test_bad_input_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="unknown token"):
        TOKENIZER.token_id("zzz")
    with pytest.raises(ConfigError, match="must be a str"):
        TOKENIZER.encode(b"red")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\[0, "):
        TOKENIZER.decode([0, 10_000])
    with pytest.raises(ConfigError, match="1-D"):
        TOKENIZER.decode(np.zeros((2, 2), dtype=np.int64))
