"""A word-level tokenizer for the embedded model: text prompts in, token ids out, and back.

The embedded model's vocabulary is a closed set of words (markers such as `ner:`, label words, content
words), so one token is one whitespace-separated word; `?` is always a token of its own, attached or not.
Unknown words map to `<unk>` rather than failing, like a real tokenizer's byte fallback, so any text an
OpenAI-compatible client sends can be scored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import attrs
import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import ConfigError

__all__ = ["PAD", "QUERY", "UNK", "Tokenizer", "pseudo_words"]

PAD = "<pad>"
UNK = "<unk>"
QUERY = "?"

_SPLIT = re.compile(r"[^\s?]+|\?")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "tr", "pl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")


def pseudo_words(n: int, seed: int, taken: Iterable[str] = ()) -> list[str]:
    """`n` distinct pronounceable nonsense words of 2-3 syllables, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    seen = set(taken)
    words: list[str] = []
    while len(words) < n:
        syllables = int(rng.integers(2, 4))
        word = "".join(
            _ONSETS[int(rng.integers(len(_ONSETS)))] + _VOWELS[int(rng.integers(len(_VOWELS)))]
            for _ in range(syllables)
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _check_tokens(_: object, __: attrs.Attribute[tuple[str, ...]], tokens: tuple[str, ...]) -> None:
    if len(tokens) < 3 or tokens[:3] != (PAD, UNK, QUERY):
        raise ConfigError(f"a vocabulary starts with {PAD!r}, {UNK!r}, {QUERY!r}")
    if len(set(tokens)) != len(tokens):
        raise ConfigError("vocabulary tokens must be distinct")
    for token in tokens[3:]:
        if not token or _SPLIT.fullmatch(token) is None:
            raise ConfigError(f"token {token!r} is empty or contains whitespace or '?'")


def _token_tuple(tokens: Iterable[str]) -> tuple[str, ...]:
    return tuple(tokens)


@attrs.frozen
class Tokenizer:
    """Maps words to ids and back; ids are positions in `tokens`, which starts with pad, unk and `?`."""

    tokens: tuple[str, ...] = attrs.field(converter=_token_tuple, validator=_check_tokens)
    _index: dict[str, int] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        """Derives the word-to-id index once (the tokens are checked by their validator)."""
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    @property
    def pad_id(self) -> int:
        """Id of the padding token, ignored by the model."""
        return 0

    @property
    def unk_id(self) -> int:
        """Id every unknown word maps to."""
        return 1

    @property
    def query_id(self) -> int:
        """Id of `?`, which ends every task prompt."""
        return 2

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._index

    def token_id(self, token: str) -> int:
        """The id of a known token; ConfigError for an unknown one."""
        try:
            return self._index[token]
        except KeyError:
            raise ConfigError(f"unknown token {token!r}") from None

    def split(self, text: str) -> list[str]:
        """The words of `text`, with `?` split off as its own word."""
        if not isinstance(text, str):
            raise ConfigError(f"text must be a str, got {type(text).__name__}")
        return _SPLIT.findall(text)

    def encode(self, text: str) -> NDArray[np.int64]:
        """Token ids of `text`; unknown words become `<unk>`."""
        return np.array([self._index.get(w, 1) for w in self.split(text)], dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Token ids of several texts, right-padded with `<pad>`, and each text's length."""
        rows = [self.encode(t) for t in texts]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        out = np.zeros((len(rows), int(lengths.max(initial=0))), dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out, lengths

    def decode(self, ids: ArrayLike) -> str:
        """The text of `ids`, words joined by spaces; padding is dropped."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ConfigError(f"ids must be a 1-D array of integers, got shape {arr.shape}, {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.tokens)):
            raise ConfigError(f"ids must lie in [0, {len(self.tokens)}), got {arr.min()}..{arr.max()}")
        return " ".join(self.tokens[int(i)] for i in arr if i != 0)
